"""Evaluation (paper Tables 1-2): a sentence-transformers-shaped encoder, MTEB suites, a rationale
cache and paper-style tables.

- ``encoder.GraceEncoder``: ``encode(texts, ...)`` in ``base`` or ``rationale`` mode;
- ``cache.RationaleCache``: rationales (+ embeddings) on disk, safe against kill -9;
- ``mteb_model.GraceMTEBModel``: the encoder as an ``mteb.evaluate`` model, per-task system
  prompts; ``mteb_model.grace_model_meta``: a ``ModelMeta`` whose loader builds it from a path;
- ``suites`` / ``local_tasks``: ``conf/eval/*.yaml`` -> MTEB tasks (mteb's, or from local files);
- ``run.evaluate``: what ``python eval.py`` does (``model=`` a backbone, run dir, export, ``.ckpt``
  or Hub id); ``report`` / ``compare``: the tables and charts.

Exports (sentence-transformers files, model card, ``.ckpt`` -> export) are in
:mod:`grace_lightning.export`.
"""

from grace_lightning.eval.encoder import GenerationSettings, GraceEncoder

__all__ = ["GenerationSettings", "GraceEncoder"]
