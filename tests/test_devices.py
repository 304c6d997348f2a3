"""Board profiles: shipped YAML files plus the user's, and the RAM fit used by deploy and --quant auto."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeft.cli import cli


def test_devices_lists_the_shipped_profiles_and_a_user_profile(edgeft_home):
    import edgeft.devices

    user = edgeft_home / "devices"
    user.mkdir(exist_ok=True)
    shipped = Path(edgeft.devices.__file__).parent / "rpi5.yaml"
    (user / "myboard.yaml").write_text(shipped.read_text().replace("name: rpi5", "name: myboard"))
    result = CliRunner().invoke(cli, ["devices", "--json"])
    assert result.exit_code == 0
    found = json.loads(result.output)
    assert {"rpi4", "rpi5", "jetson-orin-nano", "x86-64", "x86-64-native", "myboard"} <= set(found)
    assert found["rpi5"]["memory_bandwidth_gbs"] == 17.1 and found["rpi5"]["memory_bandwidth_source"]
    (user / "myboard.yaml").unlink()


def test_memory_need_counts_the_kv_cache_and_fit_leaves_room_for_the_os():
    from edgeft.devices import fits, get, kv_cache_bytes, memory_need

    config = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576}
    kv = kv_cache_bytes(config, 2048)
    assert kv == 2 * 30 * 3 * 64 * 2048 * 2  # K and V, layers, kv heads, head dim, context, f16
    need = memory_need(100 * 2**20, config, 2048)
    assert need > 100 * 2**20 + kv
    rpi4 = get("rpi4")
    ok, usable = fits(rpi4, need)
    assert ok and usable < min(rpi4.ram_gb) * 2**30
    assert not fits(rpi4, 100 * 2**30)[0]


def test_a_profile_is_data_never_shell(edgeft_home, tmp_path):
    """Profile fields reached a local `shell=True` command line in smoke (`qemu-ARCH-static -cpu QEMU_CPU ...`)
    and an unquoted one on the board in deploy: a user-added profile could run commands. Names are now
    validated when a profile loads, and smoke runs argument lists without a shell."""
    import pytest

    import edgeft.devices

    from .conftest import assert_one_line_error

    marker = tmp_path / "pwned"
    rpi5 = (Path(edgeft.devices.__file__).parent / "rpi5.yaml").read_text()
    user = edgeft_home / "devices"
    user.mkdir(exist_ok=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text('{"steps": []}')
    try:
        for field, evil in [("qemu_cpu", f"'max; touch {marker}'"), ("arch", f"'aarch64$(touch {marker})'"),
                            ("name", "'../../x'"), ("threads", "1.5"), ("cmake", "'-DX=1'")]:
            text = rpi5.replace("name: rpi5", "name: evil")
            text = "\n".join(f"{field}: {evil}" if line.startswith(f"{field}:") else line for line in text.splitlines())
            (user / "evil.yaml").write_text(text)
            assert_one_line_error(CliRunner().invoke(cli, ["devices"]), "evil.yaml", f"'{field}'")
            assert_one_line_error(CliRunner().invoke(cli, ["smoke", str(run), "--emulate", "--device", "evil"]),
                                  "evil.yaml")
        (user / "evil.yaml").write_bytes(b"\xff\xfe")
        assert_one_line_error(CliRunner().invoke(cli, ["devices"]), "evil.yaml", "not UTF-8")
    finally:
        (user / "evil.yaml").unlink()
    assert not marker.exists()
    with pytest.raises(Exception):
        edgeft.devices.get("evil")


def test_kv_cache_is_sized_from_either_config_vocabulary():
    """GPT-2-style configs (n_head/n_embd/n_layer: converted by llama.cpp's converter) size the KV cache like
    Llama-style ones, instead of a KeyError under --quant auto."""
    from edgeft.devices import kv_cache_bytes
    from edgeft.errors import EdgeftError

    llama = {"num_attention_heads": 4, "hidden_size": 64, "num_hidden_layers": 2}
    gpt2 = {"n_head": 4, "n_embd": 64, "n_layer": 2}
    assert kv_cache_bytes(gpt2, 128) == kv_cache_bytes(llama, 128) == 2 * 128 * 2 * 4 * 16 * 2
    assert kv_cache_bytes({**llama, "num_key_value_heads": 2}, 128) == kv_cache_bytes(llama, 128) // 2
    with pytest.raises(EdgeftError, match="config.json: no attention heads"):
        kv_cache_bytes({"vocab_size": 10}, 128)
