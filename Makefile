# The two set-up commands of the README. Each builds .venv/ first if it is missing or stale.
PY := .venv/bin/python
STAMP := .venv/.d2_focalstar_installed

.PHONY: quickstart test install results clean-venv

# Train FL* on the embedded dataset (generated on first use), evaluate, print the COCO AP table.
quickstart: $(STAMP)
	$(PY) train_net.py --config-file configs/quickstart_flstar.yaml

# The test suite (CPU; the time on 2 cores is in the README), with its 15 slowest tests.
test: $(STAMP)
	$(PY) -m pytest tests --durations=15

install: $(STAMP)

# Rebuild docs/RESULTS.md's tables and plots from the committed result files (no training).
results: $(STAMP)
	bash tools/rebuild_results.sh

$(STAMP): tools/setup_env.sh tools/constraints-mirror.txt requirements.txt setup.py
	bash tools/setup_env.sh

clean-venv:
	rm -rf .venv
