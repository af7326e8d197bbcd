# Two commands: `make demo` (toy pipeline end to end) and `make test` (the CPU test suite).
PY := .venv/bin/python
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# One thread per process: on 2 shared cores, torch's default thread pool is 10-100x slower.
export OMP_NUM_THREADS ?= 1

.PHONY: demo test bench clean

.venv/done: requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch .venv/done

demo: .venv/done
	bash runs/toy_cpu.sh

test: .venv/done
	$(PY) -m pytest -q -rs --durations=8 tests  # -rs: every skip says why

bench: .venv/done
	$(PY) bench/bench_logps.py
	$(PY) bench/bench_sampling.py
	$(PY) bench/bench_dpo_step.py
	$(PY) bench/bench_localize.py

clean:
	rm -rf runs/toy runs/toy-s[0-9]*
