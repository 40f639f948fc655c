"""usbipyd's options and keys for the headset and the webcam."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import daemon_settings, write_wav
from usbipy.cli import usbipyd
from usbipy.devices import Tone, UsbAudio, WavSink, WavSource, Webcam
from usbipy.server.service import emulated_devices


def devices(*argv: str, config: Path | None = None) -> list[object]:
    settings = daemon_settings("-c", str(config or "/dev/null"), *argv)
    return list(emulated_devices(settings.options))


def test_options_add_the_streamers_after_the_demo(tmp_path: Path) -> None:
    made = devices("--demo", "--disk-size", "1048576", "--audio", "--tone", "440",
                   "--webcam", "bulk")
    assert [type(d).__name__ for d in made] == ["HidKeyboard", "MassStorage", "CdcAcm",
                                                "UsbAudio", "Webcam"]
    audio, camera = made[3], made[4]
    assert isinstance(audio, UsbAudio) and isinstance(audio.microphone, Tone)
    assert audio.microphone.frequency == 440 and audio.speaker is None
    assert isinstance(camera, Webcam) and camera.transport == "bulk"
    # --speaker or --microphone alone imply --audio
    path = write_wav(tmp_path / "mic.wav", bytes(64), rate=16000)
    (only,) = devices("--microphone", str(path), "--speaker", str(tmp_path / "out.wav"))
    assert isinstance(only, UsbAudio) and isinstance(only.microphone, WavSource)
    assert isinstance(only.speaker, WavSink) and only.mic_rates == (16000,)


def test_the_configuration_file_sets_them(tmp_path: Path) -> None:
    config = tmp_path / "usbipyd.toml"
    config.write_text('[devices]\naudio = true\ntone = 523.25\nwebcam = "iso"\n')
    audio, camera = devices(config=config)
    assert isinstance(audio, UsbAudio) and isinstance(audio.microphone, Tone)
    assert audio.microphone.frequency == 523.25
    assert isinstance(camera, Webcam) and camera.transport == "iso"
    config.write_text("[devices]\ntone = 0\n")
    assert usbipyd.main(["-c", str(config), "--check-config"]) == 1


def test_a_file_the_microphone_cannot_play_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stereo = write_wav(tmp_path / "stereo.wav", bytes(8), channels=2)
    for argv in (["--microphone", str(stereo)], ["--microphone", str(tmp_path / "none.wav")]):
        assert usbipyd.main(["-c", "/dev/null", *argv, "--check-config"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("usbipyd: "), err
    assert usbipyd.main(["-c", "/dev/null", "--audio", "--webcam", "--check-config"]) == 0
