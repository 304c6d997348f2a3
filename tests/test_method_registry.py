"""PEFT methods as a registry: each method answers for itself (config, targets, rates, reading its update, the
adapter GGUF), a name is registered once, and a new method is one module."""

import pytest

from edgeft import methods
from edgeft.errors import EdgeftError
from edgeft.methods.registry import Method, register


def test_the_shipped_methods_in_order_and_one_rate_table():
    assert methods.names() == ("lora", "rslora", "dora", "ia3")
    assert methods.lr_defaults("lr") == {"lora": 2e-4, "rslora": 2e-4, "dora": 2e-4, "ia3": 3e-3}
    from edgeft.compare import DEFAULT_LR

    assert DEFAULT_LR == "0.001,rslora=0.00025,ia3=0.015"  # compare's measured short-run rates, from the same table
    assert [m for m in methods.names() if methods.get(m).adapter_gguf] == ["lora", "rslora"]


@pytest.mark.parametrize("config,name", [
    ({"peft_type": "LORA", "r": 8, "lora_alpha": 16}, "lora"),
    ({"peft_type": "LORA", "use_rslora": True}, "rslora"),
    ({"peft_type": "LORA", "use_dora": True}, "dora"),
    ({"peft_type": "LORA", "use_dora": True, "use_rslora": True}, "dora"),
    ({"peft_type": "IA3"}, "ia3"),
])
def test_a_saved_adapter_is_recognised_by_exactly_one_method(config, name):
    assert methods.of_adapter(config, "x").name == name


def test_unknown_and_undeployable_methods_are_one_line():
    with pytest.raises(EdgeftError, match="prompt tuning adds virtual tokens"):
        methods.get("prompt")
    with pytest.raises(EdgeftError, match="unknown; use lora, rslora, dora, ia3"):
        methods.get("vera")
    with pytest.raises(EdgeftError, match="a LOHA adapter"):
        methods.of_adapter({"peft_type": "LOHA"}, "x")


def test_a_name_is_registered_once():
    class Again(Method):
        name = "lora"

    with pytest.raises(ValueError, match="registered twice"):
        register(Again)
    assert type(methods.get("lora")).__name__ == "LoRA"
