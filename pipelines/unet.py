"""The UNet families (SD1.x, SD2.x, SDXL): negative prompts, classifier-free guidance, step callbacks."""

from studio.pipelines.base import register_call, standard_call

register_call("sd1", "sd2", "sdxl")(standard_call)
