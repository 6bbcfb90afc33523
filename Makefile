# The two set-up commands of the README. Each builds .venv/ first if it is missing or stale.
PY := .venv/bin/python
STAMP := .venv/.d2_focalstar_installed

.PHONY: quickstart test install clean-venv

# Train FL* on the embedded dataset (generated on first use), evaluate, print the COCO AP table.
quickstart: $(STAMP)
	$(PY) train_net.py --config-file configs/quickstart_flstar.yaml

# The test suite (CPU, ~10 minutes on 2 cores).
test: $(STAMP)
	$(PY) -m pytest tests

install: $(STAMP)

$(STAMP): tools/setup_env.sh requirements.txt setup.py
	bash tools/setup_env.sh

clean-venv:
	rm -rf .venv
