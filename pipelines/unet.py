"""The UNet families (SD1.x, SD2.x, SDXL): negative prompts, classifier-free guidance, step callbacks."""

from studio.pipelines.base import CALLS, standard_call

CALLS.register("sd1", "sd2", "sdxl")(standard_call)
