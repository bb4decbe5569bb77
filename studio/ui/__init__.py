"""The web UI's tabs (app.py builds the page from them): one module per tab, `common` for what they share.

Every handler is a plain function, tested directly in tests/test_app.py; a tab's builder only wires them to
components. Gradio loads only when a page is built or a handler runs.
"""
