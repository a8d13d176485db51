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

# Main job (for now): write ShapesRef (val, and the 64 train scenes calibration draws from), score the embedded
# lavt-tiny on val, calibrate it with PTQ4RIS (deployable form) at W8A8, score the simulated quantized model, export
# the .pte for Android and the .mlpackage for iPhone from the same calibration, and check that each computes what was
# simulated (the .pte on the ExecuTorch runtime over all val pairs; the package with the MIL interpreter over the
# first 300, since interpreting it in numpy is ~8x slower).
demo: setup
	$(BIN)/ptq4ris data synth --out $(DATA) --splits train val --train-scenes 64
	$(BIN)/ptq4ris evaluate --refer-root $(DATA) --split val
	$(BIN)/ptq4ris calibrate --refer-root $(DATA) --method ptq4ris-deploy --bits w8a8 --out runs/lavt-tiny-w8a8
	$(BIN)/ptq4ris evaluate --refer-root $(DATA) --split val --quantized runs/lavt-tiny-w8a8
	$(BIN)/ptq4ris export-pte --refer-root $(DATA) --quantized runs/lavt-tiny-w8a8 --out runs/pte/lavt-tiny-w8a8.pte \
		--stages full
	$(BIN)/ptq4ris parity --refer-root $(DATA) --split val --quantized runs/lavt-tiny-w8a8 \
		--pte runs/pte/lavt-tiny-w8a8.pte
	$(BIN)/ptq4ris export-coreml --refer-root $(DATA) --quantized runs/lavt-tiny-w8a8 \
		--out runs/coreml/lavt-tiny-w8a8.mlpackage
	$(BIN)/ptq4ris parity --refer-root $(DATA) --split val --quantized runs/lavt-tiny-w8a8 \
		--coreml runs/coreml/lavt-tiny-w8a8.mlpackage --limit 300

test: setup
	$(BIN)/python -m pytest -q

# Debian packages the device harness and the report tests use (qemu-user, the aarch64 cross compiler, adb,
# kotlin, chromium). Needs root (or sudo).
system-tools:
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		qemu-user g++-aarch64-linux-gnu adb kotlin default-jre-headless chromium chromium-driver cmake procps >/dev/null

# The device harness on the demo's programs: an emulated arm64 phone (qemu) by default; ADB_ARGS=--adb for a phone.
device-parity: setup
	$(BIN)/python -m mobile_runtime.native_runner build --target aarch64
	$(BIN)/python tests/device_parity.py --pte runs/pte/lavt-tiny-w8a8.pte --quantized runs/lavt-tiny-w8a8 $(ADB_ARGS)

# Retrain the embedded default (minutes on a GPU, hours on a CPU; resumable: rerun to continue).
train-default: setup
	$(BIN)/ptq4ris data synth --out $(DATA) --splits train val --workers 4
	$(BIN)/ptq4ris train --data-root $(DATA) --out runs/lavt-tiny --batch-size 256 --steps 5000

clean:
	rm -rf $(VENV) $(DATA) runs
