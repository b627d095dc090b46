# Two entry points: `make demo` and `make test`. Both create .venv on first use.
# TORCH pins the CPU build this kind of machine holds; on a CUDA box `make TORCH=torch ...`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
export MUJOCO_GL ?= egl

.PHONY: setup demo test test-slow test-kernels lint typecheck clean test-hub-versions

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,deploy,zoo,ray,lerobot,serve,ogbench,tracking]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/dql-agent demo

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# The stored-output regression tests once more on kernel paths other than this CPU's own, standing in
# for the machines CI never sees: ATen's plain C++ kernels (no machine runs them unasked), alone and
# with MKL's compatible mode (together the largest deviations measured; tests/regression_cases.py).
REGRESSION_TESTS := tests/test_regression.py
test-kernels: setup
	ATEN_CPU_CAPABILITY=default $(BIN)/python -m pytest -q -p no:cacheprovider $(REGRESSION_TESTS)
	ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE $(BIN)/python -m pytest -q -p no:cacheprovider $(REGRESSION_TESTS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

# The Hub tests on other huggingface_hub versions than .venv's: the lowest pyproject.toml allows, and
# the one huggingface-sb3 3.0 (pinning huggingface-hub~=0.8) brings. Each env is a venv under
# $(VENV)/hub-envs whose .pth puts .venv's site-packages behind its own, so pip installs only what the
# env pins (seconds) and that shadows .venv's copy; the tests check which version they ran.
# --no-warn-conflicts: .venv's sb3-team-hf-integration wants huggingface_hub>=2, broken here on purpose.
HUB_FLOOR ?= 0.23.0
HUB_TESTS := tests/test_hub.py tests/test_hub_server.py tests/test_hub_versions.py \
	tests/test_cli.py::test_train_evaluate_record_push tests/test_contract.py::test_push_to_hub_and_load_from_hub \
	tests/test_export.py::test_a_hub_model_exports_with_its_weights_digest tests/test_examples.py::test_train_push_evaluate_record
HUB_ENVS := $(VENV)/hub-envs
PURELIB := import sysconfig; print(sysconfig.get_paths()["purelib"])

# $(call hub-env,NAME,PIP REQUIREMENT,VERSIONS THE TESTS EXPECT (see tests/test_hub_versions.py))
define hub-env
rm -rf $(HUB_ENVS)/$(1)
$(BIN)/python -m venv --without-pip $(HUB_ENVS)/$(1)
echo "import site; site.addsitedir('$$($(BIN)/python -c '$(PURELIB)')')" \
	> "$$($(HUB_ENVS)/$(1)/bin/python -c '$(PURELIB)')/dql_agent_main_venv.pth"
$(HUB_ENVS)/$(1)/bin/python -m pip install -q --disable-pip-version-check --no-warn-conflicts "$(2)"
$(3) $(HUB_ENVS)/$(1)/bin/python -m pytest -q -p no:cacheprovider $(HUB_TESTS)
endef

test-hub-versions: setup
	$(call hub-env,floor,huggingface-hub==$(HUB_FLOOR),DQL_AGENT_HF_HUB=$(HUB_FLOOR))
	$(call hub-env,sb3,huggingface-sb3==3.0,DQL_AGENT_HF_HUB=0. DQL_AGENT_HF_SB3=3.0)

clean:
	rm -rf $(VENV) dql_demo .pytest_cache
