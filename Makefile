# The two commands a fresh machine needs: `make demo` (the main job) and `make test`.
# Both install libtorch first (PyTorch 2.13.0 from PyPI into a venv cached under ~/.cache/ivado).
CARGO ?= cargo
RUN_DIR ?= runs/quickstart

.PHONY: setup build demo test lint clean-runs

setup:
	./scripts/setup-libtorch.sh

build: setup
	$(CARGO) build --release --workspace

demo: build
	./target/release/ivado run scripts/quickstart.rhai $(RUN_DIR)

# The plugin libraries must exist before the tests load them, hence the build first.
test: build
	$(CARGO) test --release --workspace

lint: setup
	$(CARGO) fmt --all --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

clean-runs:
	rm -rf runs
