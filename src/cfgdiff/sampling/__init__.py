"""Sampling: the samplers (samplers.py), guidance (guidance.py), the settings a job is sampled
with (settings.py), what it is conditioned on (conditions.py), batched generation
(generate.py), a sampling request from a user's asks to images and their record (request.py),
and the pictures made by sampling (previews.py, animation.py). Import from the modules; this
file imports nothing, so that config.py can read the sampler table below the rest."""
