"""The README.md written next to a trained model: what it was trained on, how, and how it did."""

from __future__ import annotations

import imtune
from imtune.masking.objectives import parse_objective

_OBJECTIVE_TEXT = {
    "it": "**Instruction Tuning (IT)**: loss on the assistant output only.",
    "im": "**Instruction Modelling (IM)** (Shi et al., NeurIPS 2024, *Instruction Tuning With Loss Over "
          "Instructions*): loss on instruction and output tokens, not on template markup.",
    "im-all": "**IM over every token**: loss on instructions, outputs and template markup.",
}

_HYPER = ("lr", "lr_scheduler", "warmup_ratio", "weight_decay", "epochs", "max_steps", "micro_batch_size",
          "gradient_accumulation_steps", "global_batch_size", "max_length", "max_grad_norm", "loss_normalization",
          "precision", "seed", "packing", "group_by_length", "neftune_alpha", "kl_coef", "kl_type")
_LORA = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "merge")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else str(v)


def objective_text(spec: str) -> str:
    obj = parse_objective(spec)
    text = _OBJECTIVE_TEXT.get(obj.name)
    if text is None:
        return obj.describe()
    if obj.last_turn_only:
        text += " Only the last assistant turn counts as output; earlier turns are weighted as prompt."
    return text


def render_model_card(cfg: dict, *, base_model: str, data_summary: dict, final_metrics: dict,
                      adapter: bool, data_notes: list[str] = (), warnings: list[str] = ()) -> str:
    """Markdown with a Hugging Face metadata header. `cfg` is the resolved TrainConfig as a dict."""
    lines = ["---", "library_name: " + ("peft" if adapter else "transformers"), "tags:", "- imtune",
             "- instruction-tuning", f"- objective-{parse_objective(cfg['objective']).name.replace(':', '-')}",
             "---", "", f"# {base_model} fine-tuned with imtune ({cfg['objective']})", ""]
    lines += [f"Base model: `{base_model}`. Trained with imtune {imtune.__version__}.", ""]
    lines += ["## Objective", "", objective_text(cfg["objective"]), "",
              f"Loss: weighted token cross-entropy summed over each optimizer step and divided by the step's total "
              f"{'weight' if cfg['loss_normalization'] == 'weight' else 'number of tokens with non-zero weight'}.",
              ""]
    lines += ["## Data", "", f"- training file: `{cfg['data']}` (template `{cfg['template']}`, max length "
                             f"{cfg['max_length']} tokens)"]
    for k, v in data_summary.items():
        if k == "encode_cache":  # a local path, of no use to whoever reads the card
            continue
        lines.append(f"- {k.replace('_', ' ')}: {_fmt(v)}")
    lines += [f"- note: {n}" for n in data_notes]
    lines += ["", "## Hyper-parameters", "", "| option | value |", "| --- | --- |"]
    keys = _HYPER + (_LORA if cfg.get("lora") else ())
    lines += [f"| {k} | {_fmt(cfg.get(k))} |" for k in keys]
    lines += [f"| fine-tuning | {'LoRA' if cfg.get('lora') else 'full'} |", ""]
    lines += ["## Final metrics", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in final_metrics.items()]
    if "eval_loss" in final_metrics:
        lines += ["", "`eval_loss` is the output-only (`it`) loss on the held-out data, whatever the training objective."]
    if warnings:
        lines += ["", "## Warnings", "", *(f"- {w}" for w in warnings)]
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'model = AutoModelForCausalLM.from_pretrained("PATH")' + ("  # needs peft; loads base + adapter"
                                                                        if adapter else ""),
              'tok = AutoTokenizer.from_pretrained("PATH")',
              'prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, '
              'add_generation_prompt=True)', "```", "",
              f"The tokenizer's chat template renders the `{cfg['template']}` format used in training. The full "
              "config is in `imtune_config.yaml`, per-step metrics in `metrics.jsonl`.", ""]
    return "\n".join(lines)
