# ptq4ris: `make demo` runs the main job, `make test` the test suite. Both set everything up first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= data

.PHONY: setup demo test system-tools device-parity train-default clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# Main job: `ptq4ris demo` writes ShapesRef (or reuses it), scores the embedded lavt-tiny, calibrates it with PTQ4RIS
# (deployable form) at W8A8, exports the Android .pte programs and the iPhone .mlpackage from the same calibration,
# checks each against the simulation and writes runs/demo/report.html. Rerun to reuse finished steps.
demo: setup
	$(BIN)/ptq4ris demo --out runs/demo --data $(DATA)

# Two workers, one test file each at a time (module fixtures are built once); the slowest tests are listed.
TEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=20

# Debian packages the device harness, the instruction counter and the report tests use (qemu-user, the aarch64
# cross compiler, valgrind, adb, kotlin, chromium). Needs root (or sudo).
system-tools:
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		qemu-user g++-aarch64-linux-gnu adb kotlin default-jre-headless chromium chromium-driver cmake procps valgrind \
		>/dev/null

# The device harness on the demo's programs: an emulated arm64 phone (qemu) by default; ADB_ARGS=--adb for a phone.
device-parity: setup
	$(BIN)/python -m mobile_runtime.native_runner build --target aarch64
	$(BIN)/python tests/device_parity.py --pte runs/demo/android/lavt-tiny-w8a8.pte --quantized runs/demo/lavt-tiny-w8a8 \
		$(ADB_ARGS)

# Retrain the embedded default (minutes on a GPU, hours on a CPU; resumable: rerun to continue).
train-default: setup
	$(BIN)/ptq4ris data synth --out $(DATA) --splits train val --workers 4
	$(BIN)/ptq4ris train --data-root $(DATA) --out runs/lavt-tiny --batch-size 256 --steps 5000

clean:
	rm -rf $(VENV) $(DATA) runs
