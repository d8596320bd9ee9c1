"""Tiny models for tests, benchmarks and first experiments, built from a config (no hub access).

- :func:`build_char_tokenizer`: a character-level fast tokenizer;
- :func:`build_tiny_qwen3`, :func:`build_tiny_qwen3_moe`: a dense and a mixture-of-experts
  Qwen3 of a few hundred thousand parameters, saved where vLLM and transformers can load them;
- :func:`supervised_step`: one teacher-forced step, for warm starts.
"""

from .tiny import build_char_tokenizer, build_tiny_qwen3, build_tiny_qwen3_moe, supervised_step

__all__ = ["build_char_tokenizer", "build_tiny_qwen3", "build_tiny_qwen3_moe", "supervised_step"]
