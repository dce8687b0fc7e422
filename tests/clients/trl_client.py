"""Runs INSIDE the trl client environment (TRL's DPOTrainer on transformers 5.x, built by .ci/clients.sh); never
imports mmloom. Driven by tests/clients/test_trl_client.py.

    python trl_client.py JOB.json

JOB["action"] == "dpo": for each run of JOB["runs"] (a loss type, or a list of them with their `loss_weights`, e.g.
RPO's ["sigmoid", "sft"] with [1, alpha], and the settings), load the `mmloom convert
--to hf-llava` export JOB["folder"] with `LlavaForConditionalGeneration` (float32) and its `AutoProcessor`, and
train it with `trl.DPOTrainer` on JOB["pairs"] (TRL's standard vision format: `images`, `prompt`, `chosen`,
`rejected` strings; the prompt holds `<image>`, which the processor expands): TRL's collator makes the batch of
every pair, and for JOB["steps"] steps `DPOTrainer.compute_loss` gives the loss and its reward metrics, the
gradient norm is taken before clipping at 1.0, and the trainer's own AdamW (`create_optimizer`, constant
learning rate) steps. Records per run the batch's `input_ids` / `completion_mask` and per step the loss,
grad_norm and metrics; with `trainer_train`, also the logs of a fresh model through `DPOTrainer.train()`. Results go to JOB["out"] (torch.save).
"""

import copy
import json
import sys

import torch
import transformers
import trl
from PIL import Image


def dpo(job):
    from datasets import Dataset
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from trl import DPOConfig, DPOTrainer

    results = {"versions": {"trl": trl.__version__, "transformers": transformers.__version__}}
    for run in job["runs"]:
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration.from_pretrained(job["folder"], dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(job["folder"])
        rows = [{"images": [Image.open(p["image"]).convert("RGB")], "prompt": p["prompt"], "chosen": p["chosen"],
                 "rejected": p["rejected"]} for p in job["pairs"]]
        dataset = Dataset.from_list(rows)
        args = DPOConfig(
            output_dir=str(job["root"] + "/trl-" + run["name"]), per_device_train_batch_size=len(rows),
            max_steps=job["steps"], learning_rate=job["lr"], lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, report_to=[], save_strategy="no", seed=0,
            dataloader_num_workers=0, use_cpu=True, max_length=None, loss_type=run["loss_type"] if isinstance(run["loss_type"], list) else [run["loss_type"]],
            loss_weights=run.get("loss_weights"), beta=run["beta"], label_smoothing=run.get("label_smoothing", 0.0), gradient_checkpointing=False,
            bf16=False, fp16=False,  # float32 as mmloom's run (on CPU, transformers 5 turns bf16 autocast on by default)
        )
        # the reference: the starting model itself, frozen (a copy made before any update)
        reference = copy.deepcopy(model).eval().requires_grad_(False)
        trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=dataset,
                             processing_class=processor)
        batch = next(iter(trainer.get_train_dataloader()))
        optimizer = trainer.create_optimizer()  # HF's AdamW and parameter groups, at the constant lr
        model.train()
        with torch.no_grad():  # DPOTrainer's reference log-probabilities of the batch's answers (no gradient)
            ref_chosen, ref_rejected = trainer.compute_ref_log_probs(reference, batch)
        logs = []
        for step in range(job["steps"]):
            trainer._metrics["train"].clear()
            loss = trainer.compute_loss(model, batch)  # DPOTrainer's loss of the batch (its metrics logged)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            logs.append({"step": step + 1, "loss": float(loss), "grad_norm": float(grad_norm),
                         **{k: float(v[-1]) for k, v in trainer._metrics["train"].items()}})
            optimizer.step()
            optimizer.zero_grad()
        results[run["name"]] = {
            "input_ids": batch["input_ids"].cpu(), "completion_mask": batch["completion_mask"].cpu(),
            "attention_mask": batch["attention_mask"].cpu(), "logs": logs,
            "ref_logps": torch.cat([ref_chosen, ref_rejected]).double().cpu(),
        }
        if run.get("trainer_train"):  # the same through DPOTrainer.train(), for the record (see the test)
            fresh = LlavaForConditionalGeneration.from_pretrained(job["folder"], dtype=torch.float32)
            trainer = DPOTrainer(model=fresh, args=args, train_dataset=dataset, processing_class=processor)
            trainer.train()
            results[run["name"]]["train_logs"] = [
                {k: float(v) for k, v in entry.items() if isinstance(v, (int, float))}
                for entry in trainer.state.log_history if "loss" in entry]
    return results


def main():
    job = json.loads(open(sys.argv[1]).read())
    results = {"dpo": dpo}[job["action"]](job)
    torch.save(results, job["out"])


if __name__ == "__main__":
    main()
