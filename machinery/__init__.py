"""The mechanisms a reader of the methods may skip: one role a file. The numbered stages and
common.py (the log-prob routine, the FSDP set-up, files and tokens) are the pipeline; these are
what they call.

  flags.py          the flag vocabulary: run, model, training and sampling flags
  models.py         reading a model dir safely: checks, tokenizer, safetensors-only loading
  checks.py         the field checks read_jsonl takes (token ids, weights, nested samples)
  generation.py     the sampler: continuous batching over KV-cache slots, each prompt computed
                    once, per-row seeds, top-p, end ids and stop strings
  sampling.py       GradedSampling (the sampling loop of 01 and 07), --batch-size auto
  resume.py         append-and-resume by record id, work shares over ranks, the progress line
  packing.py        the training batches: padded rows, or packed ones (each context once) with
                    the attention mask that makes them exact
  pairs.py          preference pairs before training: the --max-length filter, the reference pass
  optimization.py   what an optimizer step calls: batch order, AdamW, lr schedule, gradient sync
                    and clipping, the NaN guard, the metrics log
  checkpoints.py    sharded checkpoints with every RNG state, LoRA merging, saving the model
  mathtext.py       the text side: load_problems, prompts, split_steps, extract_answer, is_equiv
  judge.py          02's optional step judge (an OpenAI-compatible endpoint)
  heatmap.py        04's critical-token page
  toyworld.py       the toy world's problems, text and exact first wrong step (00; 02 on toy runs)
"""
