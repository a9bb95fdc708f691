# `make run`: the quickstart. `make test`: the test suite. Both create .venv when missing.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test bench rehearse clean

$(STAMP): pyproject.toml
	date +%s > .install-start
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test,face,pose]'
	# mediapipe/rtmlib without their declared deps (protobuf<5 vs wandb; opencv-python vs headless): see pyproject
	$(VENV)/bin/pip install --quiet --no-deps mediapipe==0.10.14 rtmlib
	# W&B's sweep-config package, for the tests only, without its numpy<2 pin: see pyproject
	$(VENV)/bin/pip install --quiet --no-deps sweeps==0.3.0
	# the install's seconds, for `python -m bench.profile.benchmarks --quickstart`
	echo $$(( $$(date +%s) - $$(cat .install-start) )) > $(VENV)/.install_seconds && rm -f .install-start
	touch $(STAMP)

# Two runs at once, one core each: the proxy's tiny models gain little from a second thread.
JOBS ?= 2

run: $(STAMP)
	$(VENV)/bin/bench run --jobs $(JOBS)

# Two pytest workers: on the 2-core box the suite took 929 s so, 1376 s in one (its slow tests wait on the
# run processes they start).
TEST_JOBS ?= 2

test: $(STAMP)
	$(VENV)/bin/pytest -q -n $(TEST_JOBS)

# Every registered method through the real `bench run` on the SD1.5 architecture (random weights) at 256 px:
# 1 train step, 2 eval images; FINISHED and its weights load back (bench/profile/rehearse.py). CI runs it.
REHEARSE_ARGS ?= --arch sd15 --resolution 256

rehearse: $(STAMP)
	$(VENV)/bin/python -m bench.profile.rehearse $(REHEARSE_ARGS)

bench: $(STAMP)
	$(VENV)/bin/python -m bench.profile.benchmarks

clean:
	rm -rf $(VENV) runs
