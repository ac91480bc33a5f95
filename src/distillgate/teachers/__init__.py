"""Teacher backends behind one interface (``base.Teacher``).

- ``loading``: model specs, GGUF dequantisation and its on-disk cache, the teacher card;
- ``engine``: ``LocalModel``, the synchronous batched engine (generation with a shared-prefix KV cache, label
  scoring, answer logprobs);
- ``local``: ``LocalTeacher``, the async ``Teacher`` over the engine (batching worker thread);
- ``wire``: OpenAI request parsing and response building;
- ``registry``: ``load_teacher(spec)`` / ``load_local_model(spec)``.

Nothing is imported here, so ``import distillgate.teachers`` stays cheap (no torch).
"""
