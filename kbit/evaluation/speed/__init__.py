"""The speed layer of the evaluation: everything that makes scoring faster without changing a bit.

It is fenced off from the plain path (:class:`kbit.evaluation.lm.ScoringLM`, lm-eval's own scoring)
because it is where an lm-eval or transformers upgrade breaks first: it re-implements HFLM's
scoring loop (:mod:`.scoring`), replays CUDA graphs (:mod:`.graphs`), compiles prompt templates
once (:mod:`.templates`) and keeps transformers' position-id check off the host (:mod:`.nosync`).
``eval.fast_scoring`` switches all of it on or off; the fidelity tests run both paths against
lm-eval's command line.
"""
