"""PT-PEFT in a transformers model, end to end: the README's walk-through as a script.

tiny LLaVA -> apply_prefix -> train (stage 1) -> apply_lora -> train (stage 2, prefixes still
training) -> save -> reload into a fresh base model -> merge -> generate.

The model is a randomly initialised tiny LLaVA (nothing is downloaded), so it runs on a CPU in
seconds; with a real checkpoint, replace ``tiny_model("llava")`` by
``LlavaForConditionalGeneration.from_pretrained(path)`` and the batch by processor outputs.

    python python/walkthrough.py
"""

from __future__ import annotations

import tempfile

import torch

import ptpeft_kernels as pk
from ptpeft_kernels.integrations.tiny import IMAGE_TOKEN, generate_kwargs, tiny_inputs, tiny_model


def train(model: torch.nn.Module, batch: dict, steps: int, lr: float) -> tuple[float, float]:
    """A few AdamW steps of next-token loss on the text tokens; returns (first, last) loss."""
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels = labels.masked_fill(labels == IMAGE_TOKEN, -100)  # no loss on image placeholders
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses[0], losses[-1]


def main(steps: int = 5, verbose: bool = True) -> dict:
    say = print if verbose else (lambda *a: None)
    model = tiny_model("llava")  # or LlavaForConditionalGeneration.from_pretrained(...)
    batch = tiny_inputs("llava", batch=2, text_len=8, pads=[0, 2])  # left-padded, with pixel_values

    # Stage 1: prefix-tuning. Attention switches to the fused "ptpeft" kernels; the model is frozen.
    pk.apply_prefix(model, num_prefix=8, reparam_hidden=64)
    say(pk.trainable_summary(model))
    stage1 = train(model, batch, steps, lr=1e-2)

    # Stage 2: LoRA on the language model's attention projections, trained with the prefixes.
    pk.apply_lora(model, r=8, alpha=16)
    say(pk.trainable_summary(model))
    stage2 = train(model, batch, steps, lr=1e-3)

    with torch.no_grad():
        logits = model(**batch).logits
    with tempfile.TemporaryDirectory() as path:
        pk.save_adapters(model, path)  # PEFT-format LoRA + prefixes, atomically written
        reloaded = pk.load_adapters(tiny_model("llava"), path)  # same base weights (same seed)
    with torch.no_grad():
        same = torch.equal(reloaded(**batch).logits, logits)

    # Inference: fold LoRA into the weights and the prefix MLP into plain tensors, then generate
    # (KV cache, left padding; the prefixes are re-read at every step, never copied per sample).
    pk.merge_lora(reloaded)
    pk.fold_prefix(reloaded)
    tokens = reloaded.generate(**batch, **generate_kwargs(max_new_tokens=8))
    say(f"stage-1 loss {stage1[0]:.3f} -> {stage1[1]:.3f}, stage-2 loss {stage2[0]:.3f} -> {stage2[1]:.3f}")
    say(f"reloaded adapters reproduce the logits: {same}")
    say("generated:", tokens[:, batch["input_ids"].shape[1] :].tolist())
    return {"stage1_loss": stage1, "stage2_loss": stage2, "reload_equal": same, "tokens": tokens}


if __name__ == "__main__":
    main()
