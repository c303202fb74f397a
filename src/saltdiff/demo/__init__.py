"""The interactive web demo (``saltdiff demo``): draw boxes, generate, compare SALT with random init.

``cli`` (the subcommand, no heavy imports), ``requests`` (the page's fields → a validated
``GenerationRequest``, one run and what the page shows of it), ``models`` (the pool of loaded
pipelines), ``page`` (the Gradio page: the only module that imports gradio).
"""
