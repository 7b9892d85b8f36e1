"""Shared helpers of the benchmark scripts: model shapes, fast random models, calibration tokens.

Every shape is a Llama-architecture configuration with random weights (no download):

- GPU shapes (bf16): ``llama2-7b``, ``llama3-8b`` (GQA 32/8, 128k vocabulary), ``tinyllama-1.1b``
  (GQA 32/4) and ``llama2-7b-4l`` (the first four layers of the 7B shape).
- CPU shapes (fp32): ``smollm2-135m`` (GQA 9/3, tied embeddings), ``small`` (four layers of the
  SmolLM2 widths) and ``tiny`` (a toy model for the smoke tests); ``llama3.2-1b`` (GQA 32/8, 128k tied
  vocabulary, 1.24 B parameters) runs in bf16 on a CPU with AVX-512 bf16 or on a GPU.

``build_model`` creates the module tree on the ``meta`` device (no memory, no time), allocates it
directly on the target device with ``to_empty`` and initialises it there with the model's own
``_init_weights`` (normal weights, unit norms, the rotary tables), so a 7B model is ready on a GPU
in well under a second.
"""

from __future__ import annotations

import torch

SHAPES: dict[str, dict] = {
    "llama2-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      intermediate_size=11008, vocab_size=32000),
    "llama2-7b-4l": dict(hidden_size=4096, num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=32,
                         intermediate_size=11008, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, vocab_size=128256, rope_theta=500000.0),
    "tinyllama-1.1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                           intermediate_size=5632, vocab_size=32000),
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
    "small": dict(hidden_size=576, num_hidden_layers=4, num_attention_heads=9, num_key_value_heads=3,
                  head_dim=64, intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, intermediate_size=96, vocab_size=256, tie_word_embeddings=True),
    "llama3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                        head_dim=64, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
                        rope_theta=500000.0),
}
GPU_SHAPES = ("llama2-7b", "llama3-8b", "tinyllama-1.1b", "llama2-7b-4l")
CPU_SHAPES = ("smollm2-135m", "small", "tiny", "llama3.2-1b")
REAL = "smollm2-real"  # the embedded SmolLM2-135M checkpoint (fastprune.models.load_model)


def llama_config(shape: str):
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape])


def build_model(shape: str, device: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A random-initialised model of ``shape`` on ``device`` in ``dtype``, in eval mode."""
    if shape == REAL:
        from fastprune.models import load_model

        return load_model("smollm2", dtype=dtype, device=device)[0]
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(llama_config(shape), dtype=dtype)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        model.apply(model._init_weights)
    if model.config.tie_word_embeddings:
        model.tie_weights()  # to_empty made a fresh tensor for each module
    return model.eval()


def random_calibration(vocab_size: int, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """(n_samples, seq_len) uniformly random token ids (no text: the timings do not depend on it)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n_samples, seq_len), generator=gen)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters (tied ones counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} threads"


def torch_pruning_targets(model: torch.nn.Module) -> tuple[dict, list]:
    """Torch-Pruning's ``num_heads`` and ``ignored_layers`` for a Llama model, matching fastprune's block scope.

    q/k/v carry their head counts; ``o_proj``, ``down_proj`` and ``lm_head`` are ignored so the
    residual (hidden) width is kept.
    """
    cfg = model.config
    num_heads, ignored = {}, [model.lm_head]
    for layer in model.model.layers:
        attn = layer.self_attn
        num_heads.update({attn.q_proj: cfg.num_attention_heads, attn.k_proj: cfg.num_key_value_heads,
                          attn.v_proj: cfg.num_key_value_heads})
        ignored += [attn.o_proj, layer.mlp.down_proj]
    return num_heads, ignored
