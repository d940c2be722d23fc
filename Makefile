# Two commands on a fresh machine: `make run` and `make test`. Each installs what is missing first.
PYTHON ?= python3
ARGS ?=
STAMP := .make/installed

.PHONY: install run test test-all lint train-digits train-digits-cond train-digits-flow train-digits-dit

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m pip install -q -e ".[dev,kdiffusion]"
	# k-diffusion without its declared dependencies: dctorch 0.1.2 pins numpy<2 and would downgrade numpy (README)
	$(PYTHON) -m pip install -q --no-deps k-diffusion==0.1.1.post1 dctorch==0.1.2 clean-fid==0.1.35 clip-anytorch==2.6.0 jsonmerge==1.9.2
	@mkdir -p $(@D) && touch $@

run: install
	$(PYTHON) scripts/run.py $(ARGS)

train-digits: install  # retrains the shipped digits-unet, two stages -> outputs/train/digits-unet-settle/model (its card)
	$(PYTHON) scripts/train.py $(ARGS)
	$(PYTHON) scripts/train.py --config-name train-digits-unet-settle $(ARGS)

train-digits-cond: install  # digits-cond, two stages -> outputs/train/digits-cond/model; its step-1500 checkpoint is digits-cond-weak
	$(PYTHON) scripts/train.py --config-name train-digits-cond-stage1 $(ARGS)
	$(PYTHON) scripts/train.py --config-name train-digits-cond $(ARGS)

train-digits-flow: install  # the rectified-flow UNet digits-flow into outputs/train/digits-flow/model
	$(PYTHON) scripts/train.py --config-name train-digits-flow $(ARGS)

train-digits-dit: install  # the class-conditional pixel DiT digits-dit into outputs/train/digits-dit/model
	$(PYTHON) scripts/train.py --config-name train-digits-dit $(ARGS)

test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -m "not slow" -q -n auto

test-all: install
	$(PYTHON) -m pytest -q

lint: install
	$(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check .
