"""TRL's DPOTrainer (trl 1.16), timed in its fairest setting, to set beside our own DPO step.

    from trl_dpo import trl_dpo_step
    trl_dpo_step(model, tok, pairs, batch_size=16, micro_batch_size=16, steps=10, warmup=2)
    # -> {"time": median seconds of the timed steps, "tokens": non-padding input tokens a step
    #     feeds, "ref_seconds": seconds of TRL's reference log-prob precompute}

The harness builds a DPOTrainer over the given pairs, runs warmup + steps optimizer steps
(max_steps) and times each one with a TrainerCallback. Trainer calls on_step_begin once it has
collated the step's micro-batches and on_step_end after clipping, AdamW, the scheduler and
zero_grad, so a timed step is what ours times: the forward and backward of every micro-batch, the
clip and the update, collation excluded. The first `warmup` steps are dropped, the median of the
rest is reported. Memory is not measured here: the caller runs this in a subprocess and reads
ru_maxrss. The model is changed in place (TRL patches its forward with a fused LM head; with LoRA,
peft injects the adapters), so hand it a model built for this call.

Token ids in, exactly those ids out. TRL 1.16 has no switch for a pre-tokenized preference
dataset: DPOTrainer.__init__ always runs `_prepare_dataset`, which extracts a prompt from text,
appends the EOS *text* to responses that lack it (Step-DPO steps have none) and tokenizes
prompt and prompt+response with `tokenizer(text)` (so with the tokenizer's BOS). What it produces
is rows of `prompt_ids`, `chosen_ids`, `rejected_ids`, the only columns its collator
(DataCollatorForPreference) and its signature columns read. So the dataset here holds those
three columns, and a subclass makes `_prepare_dataset` return it unchanged: no text, no added
BOS or EOS. The collator then builds input_ids = prompt + chosen for the first half of the batch
and prompt + rejected for the second, right-padded to the longest row, with attention_mask and a
completion_mask over the response tokens; `max_length=None` turns off its truncation (and the
filter that drops prompts longer than max_length). A tokenizer is still required
(processing_class), but with these rows TRL reads only its pad id; without one, a stand-in that
knows only the pad token is built.

The TRL setting (DPOConfig), and why:
    precompute_ref_log_probs=True   reference log-probs computed once, in DPOTrainer.__init__,
                                    before any step (and without a reference copy of the model),
                                    so the timed steps run the policy only; ref_seconds times it
    loss_type=["sigmoid"], beta     the standard DPO loss, which ours computes
    per_device_train_batch_size=m,  a step of B pairs is B // m micro-batches of m pairs; each
    gradient_accumulation_steps     micro-batch is one (2m, T) forward, chosen and rejected
      =B // m                       concatenated (TRL's collator does this, as ours does)
    max_length=None,                no truncation and no padding beyond the longest row
      pad_to_multiple_of=None
    learning_rate=1e-5, optim=      our optimizer: fused AdamW, lr 1e-5, no weight decay,
      adamw_torch_fused,            constant lr without warmup, gradients clipped at norm 1
      weight_decay=0, lr_scheduler_type=constant, max_grad_norm=1.0
    bf16=False, activation_checkpointing=False
                                    TRL's defaults are bf16 autocast and activation
                                    checkpointing (its gradient_checkpointing=True, which
                                    transformers 5 reads as activation_checkpointing unless that
                                    is set); ours runs float32 and keeps activations
    train_sampling_strategy=sequential
                                    the pairs in the order given, not shuffled
    use_cpu=True, dataloader_num_workers=0, dataloader_pin_memory=False, seed=0
    eval_strategy=no, save_strategy=no, logging_strategy=no, report_to=none, disable_tqdm=True
                                    nothing but training in the timed steps, and quiet
    include_num_input_tokens_seen=non_padding
                                    Trainer counts attention_mask.sum() of every micro-batch, so
                                    `tokens` is what TRL fed, counted as ours counts it

TRL still computes its logging metrics (entropy, rewards, accuracies: a few .item() syncs per
micro-batch) inside every step; there is no switch for them, and they are part of its cost.
LoRA goes in as `peft_config` (r, alpha 2r, dropout 0, the given target modules): TRL wraps the
model itself and takes the adapter-disabled base as the reference. A model already wrapped in a
PeftModel would instead get a second, frozen "ref" copy of the adapter.
"""
import os
import statistics
import tempfile
import time

import datasets
from transformers import PrinterCallback, TrainerCallback
from trl import DPOConfig, DPOTrainer

COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")  # what TRL's preference collator reads


class PretokenizedDPOTrainer(DPOTrainer):
    """DPOTrainer on rows that already hold COLUMNS; times its reference precompute."""

    ref_seconds = None

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # TRL would rebuild these columns from text (adding BOS and EOS); ours are final already
        return dataset

    def _precompute_ref_logps(self, dataset, name, batch_size):
        t0 = time.perf_counter()
        dataset = super()._precompute_ref_logps(dataset, name, batch_size)
        self.ref_seconds = time.perf_counter() - t0
        return dataset


class StepTimer(TrainerCallback):
    """Wall time and non-padding input tokens of every optimizer step."""

    def __init__(self):
        self.seconds, self.tokens = [], []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start, self._seen = time.perf_counter(), state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)
        self.tokens.append(state.num_input_tokens_seen - self._seen)


def trl_dpo_step(model, tok, pairs, batch_size, micro_batch_size, steps, warmup, beta=0.1,
                 lora_r=0, lora_targets=None) -> dict:
    """Time TRL's DPO optimizer step on `pairs` (dicts of prompt_ids, chosen_ids, rejected_ids)."""
    if batch_size % micro_batch_size:
        raise ValueError(f"batch {batch_size} is not a multiple of micro-batch {micro_batch_size}")
    quiet()
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:  # Trainer wants an output_dir; nothing is saved
        trainer = PretokenizedDPOTrainer(
            model=model,
            args=dpo_config(out, batch_size, micro_batch_size, warmup + steps, beta),
            train_dataset=pair_dataset(pairs, (warmup + steps) * batch_size),
            processing_class=tok if tok is not None else pad_only_tokenizer(model),
            peft_config=lora_config(lora_r, lora_targets),
            callbacks=[timer],
        )
        trainer.remove_callback(PrinterCallback)  # it prints the end-of-training summary
        trainer.train()
    timed = timer.tokens[warmup:]
    return {"time": statistics.median(timer.seconds[warmup:]),
            "tokens": round(statistics.mean(timed)) if timed else None,
            "ref_seconds": trainer.ref_seconds}


def dpo_config(out, batch_size, micro_batch_size, max_steps, beta) -> DPOConfig:
    """The setting the module docstring gives its reasons for."""
    return DPOConfig(
        output_dir=out,
        per_device_train_batch_size=micro_batch_size,
        gradient_accumulation_steps=batch_size // micro_batch_size,
        max_steps=max_steps,
        precompute_ref_log_probs=True,
        loss_type=["sigmoid"],
        beta=beta,
        max_length=None,
        pad_to_multiple_of=None,
        learning_rate=1e-5,
        optim="adamw_torch_fused",
        weight_decay=0.0,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        bf16=False,
        activation_checkpointing=False,
        train_sampling_strategy="sequential",
        use_cpu=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        seed=0,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
    )


def pair_dataset(pairs, rows: int) -> datasets.Dataset:
    """The pairs in the order given, repeated to `rows` rows so max_steps never runs out."""
    rows = [pairs[i % len(pairs)] for i in range(rows)]
    return datasets.Dataset.from_dict({c: [list(p[c]) for p in rows] for c in COLUMNS})


def pad_only_tokenizer(model):
    """A tokenizer that knows only the pad token: all TRL reads from one on token-id rows."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    vocab = Tokenizer(models.WordLevel({"<pad>": pad}, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=vocab, pad_token="<pad>")


def lora_config(r: int, targets):
    """peft LoRA for TRL to wrap the model with (None: full fine-tuning)."""
    if not r:
        return None
    from peft import LoraConfig
    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=list(targets) if targets else None)


def quiet():
    """No progress bars: TRL's precompute bar obeys only TQDM_DISABLE, datasets' map its own."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    datasets.disable_progress_bars()
