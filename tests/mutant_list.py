"""The curated mutations ``python tests/mutants.py`` applies, one at a time, to a copy of the repository.

Each is a bug a user would notice, written as one exact text replacement in one file, with the
tests that must catch it. To add one, append a ``Mutant``:

* ``name``: short, unique, kebab-case (``--only NAME`` selects it);
* ``file``: path from the repository root;
* ``find``: text that occurs exactly once in that file (one line, or a unique part of one);
* ``replace``: what it becomes;
* ``tests``: test files or node ids (``path::test_name``) to run; the mutant is killed when any fails;
* ``notice``: what a user would notice if the mutation shipped.

Every bug fix should add its bug here (issue 14), so a later change that brings it back is caught.
Keep the named tests few and cheap: the runner stops at the first failure (``-x``), but a mutant
that survives runs all of them.
"""

from __future__ import annotations

from typing import NamedTuple


class Mutant(NamedTuple):
    name: str
    file: str
    find: str
    replace: str
    tests: tuple[str, ...]
    notice: str


MUTANTS: list[Mutant] = [
    # ---- issue 14: survivors and accidental catches of the first hand mutation run
    Mutant(
        "peft-alpha-pattern-empty",
        "ptpeft_kernels/integrations/checkpoint.py",
        '"alpha_pattern": {n: m.alpha for n, m in layers.items() if m.alpha != alpha},',
        '"alpha_pattern": {},',
        ("tests/integrations/test_peft_export.py",),
        "a LoRA export with per-layer alphas loads into peft at the majority alpha everywhere: other logits",
    ),
    Mutant(
        "peft-rank-pattern-empty",
        "ptpeft_kernels/integrations/checkpoint.py",
        '"rank_pattern": {n: m.r for n, m in layers.items() if m.r != r},',
        '"rank_pattern": {},',
        ("tests/integrations/test_peft_export.py",),
        "a LoRA export with two ranks does not load into peft (shape mismatch)",
    ),
    Mutant(
        "peft-rslora-dropped",
        "ptpeft_kernels/integrations/checkpoint.py",
        '"use_rslora": rslora.pop(),',
        '"use_rslora": False,',
        ("tests/integrations/test_peft_export.py",),
        "an rsLoRA export loads into peft with alpha / r instead of alpha / sqrt(r): other logits",
    ),
    Mutant(
        "clip-never-applied",
        "ptpeft_kernels/train/loop.py",
        "if cfg.max_grad_norm > 0:",
        "if cfg.max_grad_norm < 0:",
        ("tests/train/test_gaps.py::test_gradient_clipping_bounds_the_norm_of_every_step",),
        "--max-grad-norm does nothing: loss spikes, divergence at high learning rates",
    ),
    Mutant(
        "rank-threshold-default-0.8",
        "ptpeft_kernels/analysis/spectrum.py",
        "def remaining_rank_ratio(features: Features, threshold: float = 0.9) -> float:",
        "def remaining_rank_ratio(features: Features, threshold: float = 0.8) -> float:",
        ("tests/analysis/test_spectrum.py::test_default_threshold_is_the_papers_0_9",),
        "remaining rank ratios no longer comparable with the paper's (0.9) numbers",
    ),
    Mutant(
        "joint-mask-causal-shift",
        "ptpeft_kernels/ops/prefix_attention.py",
        "torch.ones(n, m, dtype=torch.bool, device=device).tril(m - n)[None, None]",
        "torch.ones(n, m, dtype=torch.bool, device=device).tril(m - n + 1)[None, None]",
        ("tests/ops/test_prefix_attention.py::test_matches_float64_reference",),
        "the CPU joint path (the built-in model's training) lets each token see the next one",
    ),
    Mutant(
        "reference-mask-causal-shift",
        "ptpeft_kernels/ops/prefix_attention.py",
        "visible = visible & (key <= query + (m - n))",
        "visible = visible & (key <= query + (m - n) + 1)",
        ("tests/ops/test_prefix_attention.py::test_library_reference_matches_first_principles",),
        "pk.prefix_attention_ref (what benchmarks and users check against) lets each token see the next one",
    ),
    Mutant(
        "triton-causal-band-shift",
        "ptpeft_kernels/ops/triton_impl/prefix_attention.py",
        's = tl.where(offs_n[None, :] <= offs_m[:, None] + diag, s, float("-inf"))',
        's = tl.where(offs_n[None, :] < offs_m[:, None] + diag, s, float("-inf"))',
        ("tests/ops/test_triton_prefix_attention.py::test_matches_float64_reference_float32",),
        "Triton attention hides each token from itself: wrong outputs on GPUs",
    ),
    Mutant(
        "torch-dropout-rate",
        "ptpeft_kernels/ops/lora.py",
        "return torch.rand(shape, generator=generator, device=device) >= p",
        "return torch.rand(shape, generator=generator, device=device) >= 0.9 * p",
        ("tests/ops/test_dropout_rate.py",),
        "--lora-dropout 0.4 drops 36 % instead of 40 %: weaker regularisation than asked for",
    ),
    Mutant(
        "triton-dropout-rate",
        "ptpeft_kernels/ops/triton_impl/_common.py",
        "return tl.uint_to_uniform_float(r0) >= p",
        "return tl.uint_to_uniform_float(r0) >= p * 0.9",
        ("tests/ops/test_dropout_rate.py::test_triton_mask_keep_rate_is_binomial",),
        "on GPUs LoRA dropout drops 36 % instead of 40 %",
    ),
    Mutant(
        "eval-seeded-shuffle",
        "ptpeft_kernels/train/loop.py",
        "mine = self.data.eval[self.dist.rank :: self.dist.world_size]",
        "mine = random.Random(0).sample(self.data.eval, len(self.data.eval))"
        "[self.dist.rank :: self.dist.world_size]",
        ("tests/train/test_gaps.py::test_builtin_task_scores_the_first_test_images_in_file_order",),
        "predictions files in another order than the evaluation file",
    ),
    Mutant(
        "eval-max-samples-keeps-last",
        "ptpeft_kernels/train/loop.py",
        "evals = evals[: cfg.max_eval_samples]",
        "evals = evals[-cfg.max_eval_samples :]",
        ("tests/train/test_gaps.py::test_builtin_task_scores_the_first_test_images_in_file_order",),
        "--max-eval-samples N scores the last N images, not the first N: scores not comparable",
    ),
    Mutant(
        "coco-eval-order-reversed",
        "ptpeft_kernels/train/data.py",
        "out.append((str(found), by_image[image_id], int(image_id)))",
        "out.insert(0, (str(found), by_image[image_id], int(image_id)))",
        ("tests/train/test_gaps.py::test_coco_file_scores_its_captioned_images_in_file_order",),
        "with a COCO captions file, --max-eval-samples keeps other images than the file's first N",
    ),
    Mutant(
        "karpathy-eval-order-reversed",
        "ptpeft_kernels/train/data.py",
        "out.append((str(found), caps, int(image_id)))",
        "out.insert(0, (str(found), caps, int(image_id)))",
        ("tests/train/test_gaps.py::test_builtin_task_scores_the_first_test_images_in_file_order",),
        "the built-in task (and any Karpathy file) evaluates its last N images under --max-eval-samples",
    ),
    Mutant(
        "gelu-is-tanh-approximation",
        "ptpeft_kernels/ops/activations.py",
        "return F.gelu(h)",
        'return F.gelu(h, approximate="tanh")',
        ("tests/ops/test_adapter.py",),
        "adapters with activation='gelu' compute the tanh approximation on the torch backend",
    ),
    # ---- issue 14: the weak spots
    Mutant(
        "autocast-lora-term-scaled",
        "ptpeft_kernels/ops/lora.py",
        "y.addmm_(h, lora_B.t(), alpha=scaling)",
        "y.addmm_(h, lora_B.t(), alpha=0.95 * scaling)",
        ("tests/ops/test_autocast.py",),
        "the LoRA update 5 % too small on the torch backend (bf16 training included)",
    ),
    Mutant(
        "autocast-lora-dx-half",
        "ptpeft_kernels/ops/lora.py",
        "dx.addmm_(dh, lora_A)",
        "dx.addmm_(dh, lora_A, alpha=0.5)",
        ("tests/ops/test_autocast.py",),
        "gradients below a LoRA layer wrong (prefixes and earlier layers train on a wrong signal)",
    ),
    Mutant(
        "lora-layer-eval-scaled-by-keep-rate",
        "ptpeft_kernels/layers/lora.py",
        "            self.scaling,\n",
        "            self.scaling if self.training else self.scaling * (1.0 - self.dropout),\n",
        ("tests/layers/test_layers.py",),
        "a LoRA model with dropout evaluates differently from its merged or peft-loaded twin",
    ),
    Mutant(
        "rank-ratio-pooled-normalisation",
        "ptpeft_kernels/analysis/spectrum.py",
        "return sv / totals",
        "return sv / totals.mean()",
        ("tests/analysis/test_spectrum.py::test_random_rank_k_at_threshold_one",),
        "rank ratios dominated by the samples with the largest hidden states",
    ),
]
