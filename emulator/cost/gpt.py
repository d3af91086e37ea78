"""Analytic GPT workloads: layer profiles from the model's dimensions.

The GPT-3 family uses the dimensions of Brown et al. 2020 ("Language Models
are Few-Shot Learners", Table 2.1): layers, d_model, heads, context 2048 and
the training batch in tokens. Two larger models answer the "what if"
questions of the vendor's claims; their dimensions are stated assumptions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from core.config import doc
from core.cost.workload import LayerProfile, Matmul, Workload
from core.precision import Precision, precision_format

#: GPT-2/GPT-3 BPE vocabulary (Brown et al. 2020, section 2.1 follows GPT-2).
GPT_VOCAB_SIZE = 50257
#: Bytes of activations per token per block kept without recomputation, in units
#: of d_model at 16 bit: 34 (Korthikanti et al. 2022, "Reducing Activation
#: Recomputation in Large Transformer Models", eq. 1); the attention scores add
#: 5 * heads * seq / d_model more.
KORTHIKANTI_BYTES_PER_TOKEN_PER_D = 34
KORTHIKANTI_SCORE_BYTES_PER_HEAD_TOKEN = 5
#: Bits of index per weight when sparse weights stream as values plus a bitmap.
SPARSE_BITMAP_BITS_PER_WEIGHT = 1


@dataclass(kw_only=True, frozen=True)
class GptSpec:
    """Dimensions of one decoder-only transformer."""

    num_layers: int = doc("transformer blocks, count")
    d_model: int = doc("hidden size, elements")
    num_heads: int = doc("attention heads, count")
    seq_len: int = doc("context length used in training, tokens", default=2048)
    batch_size: int = doc("training batch, sequences")
    vocab_size: int = doc("vocabulary, tokens", default=GPT_VOCAB_SIZE)
    source: str = doc("where the dimensions come from")


_GPT3 = "Brown et al. 2020, Table 2.1"
#: batch in sequences = the paper's batch in tokens / 2048 (0.5M -> 256, 1M -> 512,
#: 2M -> 1024, 3.2M -> 1536 as used in the paper's training runs).
GPT_SPECS: dict[str, GptSpec] = {
    "gpt3-125m": GptSpec(num_layers=12, d_model=768, num_heads=12, batch_size=256, source=_GPT3),
    "gpt3-350m": GptSpec(num_layers=24, d_model=1024, num_heads=16, batch_size=256, source=_GPT3),
    "gpt3-760m": GptSpec(num_layers=24, d_model=1536, num_heads=16, batch_size=256, source=_GPT3),
    "gpt3-1.3b": GptSpec(num_layers=24, d_model=2048, num_heads=24, batch_size=512, source=_GPT3),
    "gpt3-2.7b": GptSpec(num_layers=32, d_model=2560, num_heads=32, batch_size=512, source=_GPT3),
    "gpt3-6.7b": GptSpec(num_layers=32, d_model=4096, num_heads=32, batch_size=1024, source=_GPT3),
    "gpt3-13b": GptSpec(num_layers=40, d_model=5140, num_heads=40, batch_size=1024, source=_GPT3),
    "gpt3-175b": GptSpec(num_layers=96, d_model=12288, num_heads=96, batch_size=1536, source=_GPT3),
    # Narayanan et al. 2021 ("Efficient Large-Scale Language Model Training on GPU
    # Clusters", Table 1, the 1008B row); batch as GPT-3 175B (assumed).
    "gpt-1t": GptSpec(
        num_layers=128,
        d_model=25600,
        num_heads=160,
        batch_size=1536,
        source="Narayanan et al. 2021, Table 1 (1008B); batch assumed",
    ),
    # Assumed "brain-scale" dimensions for the vendor's 120T claim: 8x GPT-3's width
    # (head size 128) and 1024 blocks gives 118.8T parameters, just inside the
    # 2.4 PB MemoryX at 20 B/parameter; batch as GPT-3 175B. Its block inputs take
    # 201 kB per token (1024 x 98304 x 2 B), so a 2048-token sequence (413 GB) fits in
    # no wafer's SRAM; 128 tokens (26 GB) is the power of two that fits a CS-2's 30 GB.
    "gpt-120t": GptSpec(
        num_layers=1024,
        d_model=98304,
        num_heads=768,
        seq_len=128,
        batch_size=1536,
        source="assumed dimensions (~120T parameters)",
    ),
}


def gpt_layers(
    spec: GptSpec,
    *,
    seq_len: int,
    precision: Precision,
    activation_checkpointing: bool,
    weight_density: float,
) -> tuple[LayerProfile, ...]:
    """Embedding, the blocks and the (tied) output head, with per-sequence figures."""
    d, s, v = spec.d_model, seq_len, spec.vocab_size
    b = precision_format(precision).bytes_per_element
    # Block parameters: QKV 3d^2+3d, projection d^2+d, MLP 8d^2+5d, two layer norms 4d.
    block_params = 12 * d * d + 13 * d
    weight_matmul_flops = 2 * 12 * d * d * s
    # QK^T and attention-times-V, each 2*s*s*d (full matrices, as Narayanan et al. count).
    attention_flops = 4 * s * s * d
    block_forward = weight_matmul_flops + attention_flops
    if activation_checkpointing:
        # Only the block input stays on the wafer; backward recomputes the forward.
        block_activations = s * d * b
        block_backward = 3 * block_forward
    else:
        block_activations = (
            s
            * d
            * (
                KORTHIKANTI_BYTES_PER_TOKEN_PER_D
                + KORTHIKANTI_SCORE_BYTES_PER_HEAD_TOKEN * spec.num_heads * s / d
            )
        )
        block_backward = 2 * block_forward
    dense_block_bytes = block_params * b
    if weight_density < 1:
        block_bytes = block_params * (weight_density * b + SPARSE_BITMAP_BITS_PER_WEIGHT / 8)
    else:
        block_bytes = dense_block_bytes
    embedding_params = (v + s) * d
    layers = [
        LayerProfile(
            name="embedding",
            num_params=embedding_params,
            weight_bytes=embedding_params * b,
            grad_bytes=embedding_params * b,
            forward_flops=0.0,  # a table lookup
            backward_flops=0.0,
            activation_bytes=0.0,
        )
    ]
    layers += [
        LayerProfile(
            name=f"block{i}",
            num_params=block_params,
            weight_bytes=block_bytes,
            grad_bytes=block_bytes,
            forward_flops=block_forward,
            backward_flops=block_backward,
            activation_bytes=block_activations,
            weight_flops_fraction=weight_matmul_flops / block_forward,
            weight_density=weight_density,
            # QKV, output projection and the two MLP matrices, one vector per token.
            matmuls=(
                Matmul(3 * d, d, s),
                Matmul(d, d, s),
                Matmul(4 * d, d, s),
                Matmul(d, 4 * d, s),
            ),
        )
        for i in range(spec.num_layers)
    ]
    # The head reuses the embedding table (tied weights, as GPT-2/3): it streams the
    # table again and sends its share of the gradient, but owns only the final norm.
    head_flops = 2 * s * d * v
    layers.append(
        LayerProfile(
            name="lm_head",
            num_params=2 * d,
            weight_bytes=v * d * b,
            grad_bytes=v * d * b,
            forward_flops=head_flops,
            backward_flops=2 * head_flops,
            activation_bytes=s * d * b,
            matmuls=(Matmul(v, d, s),),
        )
    )
    return tuple(layers)


def gpt_workload(
    model: str,
    *,
    batch_size: int | None = None,
    seq_len: int | None = None,
    precision: Precision = "fp16",
    activation_checkpointing: bool = True,
    weight_density: float = 1.0,
) -> Workload:
    """A named GPT model as a ``Workload`` (batch and context default to the paper's)."""
    if model not in GPT_SPECS:
        raise ValueError(f"Unknown GPT model {model!r}; choose one of {', '.join(GPT_SPECS)}.")
    spec = GPT_SPECS[model]
    if seq_len is not None:
        spec = dataclasses.replace(spec, seq_len=seq_len)
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if value is not None and value < 1:
            raise ValueError(f"{name} = {value!r} is not valid; it must be >= 1.")
    if not 0 < weight_density <= 1:
        raise ValueError(f"weight_density = {weight_density!r} is not valid; it must be in (0, 1].")
    layers = gpt_layers(
        spec,
        seq_len=spec.seq_len,
        precision=precision,
        activation_checkpointing=activation_checkpointing,
        weight_density=weight_density,
    )
    return Workload(
        name=model,
        layers=layers,
        samples_per_step=batch_size or spec.batch_size,
        tokens_per_sample=spec.seq_len,
        precision=precision,
    )


__all__ = ["GPT_SPECS", "GptSpec", "gpt_layers", "gpt_workload"]
