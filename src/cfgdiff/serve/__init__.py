"""A local web page to play with a model (`cfgdiff serve`): class buttons (a text model: a prompt
box, its classes' prompts as buttons, a negative prompt), a guidance-scale slider, a live
preview of the predicted x0 while it denoises in a gallery that wraps, strips of several scales,
the final PNG and the `cfgdiff sample` command that makes it again, and the last runs.

    schema.py the request's fields: labels, types, bounds; refusals worded and capped
    jobs.py   requests checked, one generation at a time with a small queue (no web imports)
    app.py    the page and its API on Starlette, served by uvicorn (the `serve` extra)
    static/   the page: HTML, JavaScript and CSS, nothing loaded from elsewhere

Both are a thin layer over `sample.generate` and its per-step callback (docs/DESIGN.md,
"Interfaces over the library").
"""
