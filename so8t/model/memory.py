"""Peak device memory of a PPO update, estimated from shapes alone (no weights, no torch ops).

An update goes through phases that hold different transient tensors on top of what stays
resident (frozen weights, trainable state, the rollout and its frozen prefix):

* sampling: the KV cache of one rollout chunk at full length, plus the prefill's per-layer
  activations or one decoding step's rows x vocabulary logits;
* reference (and prefix, recompute): one chunk's no-grad forward, then its rows x response x
  vocabulary logits in fp32 (logits, temperature-scaled copy, log-softmax);
* PPO: one micro-batch's forward with the activations autograd saves in the layers from the
  first adapter on (the frozen layers below save none: nothing there needs a gradient), or,
  with gradient checkpointing, each such layer's input plus one layer recomputed; the fp32
  logits chain of the loss and entropy; then the backward.

The per-token byte counts of a decoder layer below follow what PyTorch autograd saves for a
Llama/Phi-3 layer whose weights are frozen: a frozen ``nn.Linear`` saves no activation (its
input is needed only for the weight's gradient), each RMSNorm keeps an fp32 copy of its input,
attention keeps q, k, v (v a view that keeps the fused qkv output alive) and its output, the
gated MLP keeps its fused gate/up output and the activation. They were checked against peaks of
tracked allocations on CPU (``benchmarks/memory_estimate.py``; the error is in the README).
"""

from __future__ import annotations

from dataclasses import dataclass, field

GIB = 1024**3
FP32 = 4
# bitsandbytes storage per quantised weight element: nf4 packs two weights per byte plus an
# absmax per block of 64 (double-quantised to 8 bit: ~0.016 byte per weight); int8 is one byte
# plus an fp32 scale per output row (negligible).
QUANTISED_BYTES = {"nf4": 0.5 + 0.016, "int8": 1.0}
# What a CUDA process holds outside torch's allocator (context, cuBLAS/cuDNN workspaces).
CUDA_CONTEXT_BYTES = int(0.5 * GIB)


@dataclass(frozen=True)
class ModelShape:
    """Sizes read from a model's config and its parameters on the meta device."""

    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int  # rows of the output embedding
    params_total: int
    params_quantisable: int  # nn.Linear weights inside the decoder layers (bitsandbytes quantises these)
    largest_linear: int  # elements of the largest of those weights (dequantised one at a time)


@dataclass(frozen=True)
class RunShape:
    """The run's settings that size its tensors."""

    dtype_bytes: int  # compute dtype of the base (4 fp32, 2 bf16/fp16)
    quantization: str  # none | nf4 | int8
    rollout_batch: int
    rollout_chunk: int  # rows per sampling / reference / recompute chunk
    micro_batch: int  # rows per PPO forward + backward
    prompt_tokens: int
    response_tokens: int
    first_adapted: int  # decoder layers below this one never change (no saved activations)
    trainable_params: int  # adapters + value head
    gradient_checkpointing: bool
    prefix_reuse: bool
    cuda: bool
    adapter_kind: str = "so8"  # so8 | lora | none (LoRA linears save their inputs)
    optimizer_states: int = 2  # fp32 tensors the optimizer keeps per trainable parameter (AdamW: 2)


@dataclass
class MemoryEstimate:
    resident: dict[str, int] = field(default_factory=dict)
    phases: dict[str, int] = field(default_factory=dict)  # transient peak of each phase
    context: int = 0

    @property
    def resident_total(self) -> int:
        return sum(self.resident.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def peak_allocated(self) -> int:
        """What torch's allocator holds at the worst moment (CUDA context excluded)."""
        return self.resident_total + max(self.phases.values())

    @property
    def peak_total(self) -> int:
        return self.peak_allocated + self.context


def weight_bytes(model: ModelShape, run: RunShape) -> int:
    if run.quantization == "none":
        return model.params_total * run.dtype_bytes
    rest = model.params_total - model.params_quantisable
    return int(model.params_quantisable * QUANTISED_BYTES[run.quantization] + rest * run.dtype_bytes)


def _layer_transient_per_token(model: ModelShape, d: int) -> int:
    """A no-grad layer's live tensors per token at its widest point (the MLP): the residual and
    its normed copy, the fused gate/up output, the activation and its product with up."""
    return d * (3 * model.hidden + 4 * model.intermediate)


def _layer_saved_per_token(model: ModelShape, run: RunShape) -> int:
    """Activations autograd saves per token in one layer of the graph (frozen weights)."""
    d, h, i = run.dtype_bytes, model.hidden, model.intermediate
    kv = model.num_kv_heads * model.head_dim
    norms = 2 * FP32 * h  # fp32 input of both RMSNorms
    attention = d * ((h + 2 * kv) + h + kv + h)  # fused qkv output (kept by v), rotated q and k, output
    mlp = d * (2 * i + i)  # fused gate/up output (kept by gate and up), activation
    saved = norms + attention + mlp
    if run.adapter_kind == "so8":
        saved += d * h  # the rotation's input (only in adapted layers; counted in all: upper bound)
    elif run.adapter_kind == "lora":
        saved += d * (h + h + h + i)  # inputs of qkv, o, gate_up and down for LoRA's weight gradients
    return saved


def estimate(model: ModelShape, run: RunShape) -> MemoryEstimate:
    d = run.dtype_bytes
    est = MemoryEstimate(context=CUDA_CONTEXT_BYTES if run.cuda else 0)
    tokens = run.prompt_tokens + run.response_tokens
    est.resident["weights"] = weight_bytes(model, run)
    # Parameters, gradients and the optimizer's state (AdamW's two moments), all fp32.
    est.resident["trainable + grads + optimizer"] = run.trainable_params * FP32 * (2 + run.optimizer_states)
    if run.prefix_reuse and run.first_adapted > 0:
        est.resident["frozen prefix"] = run.rollout_batch * tokens * model.hidden * d
    dequantised = model.largest_linear * d if run.quantization != "none" else 0

    c = run.rollout_chunk
    kv_cache = 2 * model.num_layers * c * tokens * model.num_kv_heads * model.head_dim * d
    prefill = c * run.prompt_tokens * _layer_transient_per_token(model, d)
    step_logits = c * model.vocab * (d + 3 * FP32)
    est.phases["sampling"] = kv_cache + max(prefill, step_logits) + dequantised

    forward = c * tokens * _layer_transient_per_token(model, d)
    logits = c * run.response_tokens * model.vocab * 3 * FP32
    est.phases["reference"] = max(forward, logits) + dequantised

    m = run.micro_batch
    graph_layers = model.num_layers - min(run.first_adapted, model.num_layers)
    per_layer = _layer_saved_per_token(model, run)
    if run.gradient_checkpointing:
        saved = m * tokens * (graph_layers * d * model.hidden + min(graph_layers, 1) * per_layer)
    else:
        saved = m * tokens * graph_layers * per_layer
    # Loss forward: fp32 logits and log-softmax, plus the entropy's probs, masked copy and
    # product; the backward then holds about three of them (grad of the log-softmax in and out).
    loss_logits = m * run.response_tokens * model.vocab * 5 * FP32
    est.phases["ppo forward + backward"] = saved + max(loss_logits, m * tokens * _layer_transient_per_token(model, d)) \
        + dequantised
    return est


def format_table(est: MemoryEstimate, budget_bytes: int | None = None) -> list[str]:
    """The breakdown as aligned text lines, in GiB."""
    def gib(n: int) -> str:
        return f"{n / GIB:8.3f} GiB" if n >= GIB // 4 else f"{n / 1024**2:8.1f} MiB"

    lines = ["memory estimate (peak = resident + the largest phase + context):"]
    for name, value in est.resident.items():
        lines.append(f"  resident  {name:28s} {gib(value)}")
    for name, value in est.phases.items():
        mark = "  <- peak" if name == est.peak_phase else ""
        lines.append(f"  phase     {name:28s} {gib(value)}{mark}")
    if est.context:
        lines.append(f"  allowance {'CUDA context':28s} {gib(est.context)}")
    lines.append(f"  total     {'estimated peak':28s} {gib(est.peak_total)}")
    if budget_bytes is not None:
        lines.append(f"  budget    {'hardware.memory_budget_gb':28s} {gib(budget_bytes)}")
    return lines
