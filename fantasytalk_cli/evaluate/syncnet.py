"""SyncNet, the audio-visual sync network the field's LSE-D / LSE-C lip-sync scores come from.

`SyncNet` has the module layout (and so the state-dict keys) of joonson/syncnet_python's `S`, so its public
checkpoint `syncnet_v2.model` (a `torch.save`d state dict) loads strictly with `load_syncnet`. The lip branch takes
(N, 3, 5, 224, 224) float BGR pixels in 0..255 (5 video frames at 25 fps), the audio branch (N, 1, 13, 20) MFCCs
(20 MFCC frames = 0.2 s at 16 kHz); both give (N, 1024) embeddings that are compared by Euclidean distance.
`write_random_syncnet` writes a random-weight checkpoint in that on-disk format for tests and benches.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from torch import nn

from fantasytalk_cli.errors import FtalkError

EMBEDDING_SIZE = 1024
"""Width of both branches' output (the reference's `num_layers_in_fc_layers`)."""
CHECKPOINT_HINT = "pass syncnet_v2.model of joonson/syncnet_python (its state dict, as released)"
_OPTIONAL_SUFFIX = ".num_batches_tracked"
"""BatchNorm's step counter: absent from checkpoints saved before PyTorch 0.4.1 and unused in eval mode, so the
one key a checkpoint may lack (the module's own zero is kept)."""
_SHOWN_KEYS = 5


class SyncNetError(FtalkError):
    """A SyncNet checkpoint cannot be used: unreadable, not a state dict, or of another layout."""


def _conv_bn(conv: nn.Module, channels: int, batch_norm: type[nn.Module]) -> list[nn.Module]:
    """A convolution, its BatchNorm and a ReLU: three consecutive Sequential slots."""
    return [conv, batch_norm(channels), nn.ReLU(inplace=True)]


def _audio_trunk() -> nn.Sequential:
    """(N, 1, 13, 20) MFCC windows -> (N, 512, 1, 1). Slot indices are the checkpoint's key indices."""
    return nn.Sequential(
        *_conv_bn(nn.Conv2d(1, 64, (3, 3), padding=(1, 1)), 64, nn.BatchNorm2d),  # 0-2
        nn.MaxPool2d((1, 1), stride=(1, 1)),  # 3 (an identity, kept for the indices)
        *_conv_bn(nn.Conv2d(64, 192, (3, 3), padding=(1, 1)), 192, nn.BatchNorm2d),  # 4-6
        nn.MaxPool2d((3, 3), stride=(1, 2)),  # 7
        *_conv_bn(nn.Conv2d(192, 384, (3, 3), padding=(1, 1)), 384, nn.BatchNorm2d),  # 8-10
        *_conv_bn(nn.Conv2d(384, 256, (3, 3), padding=(1, 1)), 256, nn.BatchNorm2d),  # 11-13
        *_conv_bn(nn.Conv2d(256, 256, (3, 3), padding=(1, 1)), 256, nn.BatchNorm2d),  # 14-16
        nn.MaxPool2d((3, 3), stride=(2, 2)),  # 17
        *_conv_bn(nn.Conv2d(256, 512, (5, 4)), 512, nn.BatchNorm2d),  # 18-20
    )


def _lip_trunk() -> nn.Sequential:
    """(N, 3, 5, 224, 224) BGR frame stacks -> (N, 512, 1, 1, 1). Slot indices are the checkpoint's key indices."""
    return nn.Sequential(
        *_conv_bn(nn.Conv3d(3, 96, (5, 7, 7), stride=(1, 2, 2)), 96, nn.BatchNorm3d),  # 0-2
        nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2)),  # 3
        *_conv_bn(nn.Conv3d(96, 256, (1, 5, 5), stride=(1, 2, 2), padding=(0, 1, 1)), 256, nn.BatchNorm3d),  # 4-6
        nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),  # 7
        *_conv_bn(nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), 256, nn.BatchNorm3d),  # 8-10
        *_conv_bn(nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), 256, nn.BatchNorm3d),  # 11-13
        *_conv_bn(nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), 256, nn.BatchNorm3d),  # 14-16
        nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2)),  # 17
        *_conv_bn(nn.Conv3d(256, 512, (1, 6, 6)), 512, nn.BatchNorm3d),  # 18-20
    )


def _head() -> nn.Sequential:
    """512 trunk features -> the 1024-wide embedding."""
    return nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, EMBEDDING_SIZE))


class SyncNet(nn.Module):
    """joonson/syncnet_python's `S`: an audio and a lip branch, each a conv trunk (`netcnnaud`, `netcnnlip`) then an
    MLP head (`netfcaud`, `netfclip`), embedding 0.2 s of MFCCs and 5 face crops in one 1024-d space."""

    def __init__(self) -> None:
        super().__init__()
        self.netcnnaud = _audio_trunk()
        self.netfcaud = _head()
        self.netfclip = _head()
        self.netcnnlip = _lip_trunk()

    def forward_aud(self, mfcc: torch.Tensor) -> torch.Tensor:
        """(N, 1, 13, 20) MFCC windows -> (N, 1024) audio embeddings."""
        return self.netfcaud(self.netcnnaud(mfcc).flatten(1))

    def forward_lip(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, 3, 5, 224, 224) float BGR stacks (0..255) -> (N, 1024) lip embeddings."""
        return self.netfclip(self.netcnnlip(frames).flatten(1))


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's state dict, read without running any code from the file."""
    if not path.is_file():
        raise SyncNetError(f"{path}: no such SyncNet checkpoint; {CHECKPOINT_HINT}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise SyncNetError(_refusal(path, str(exc))) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        reason = str(exc) or f"{type(exc).__name__}: empty or cut short"
        raise SyncNetError(f"{path} is not a readable torch checkpoint ({reason}); {CHECKPOINT_HINT}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SyncNetError(
            f"{path} holds a {type(state).__name__}, not a state dict of tensors as syncnet_v2.model does; "
            f"{CHECKPOINT_HINT}"
        )
    return state


def _refusal(path: Path, error: str) -> str:
    """A message for a file the weights-only unpickler refused, from the reason torch gives after its advice."""
    reason = error.rpartition("WeightsUnpickler error:")[2].strip()
    found = re.search(r"Unsupported global: GLOBAL (\S+)", reason)
    if found:
        return (
            f"{path} holds more than tensors (a pickled {found.group(1)}, which the weights-only loader refuses: "
            f"ftalk does not run code from checkpoints); it is not a plain state dict. {CHECKPOINT_HINT}"
        )
    detail = reason.split("\n\n")[0].strip() or "no reason given"
    return f"{path} is not a readable torch checkpoint (the weights-only loader stops at: {detail}); {CHECKPOINT_HINT}"


def _shown(keys: list[str]) -> str:
    """The first few of `keys` and their count, for an error message."""
    more = f", ... ({len(keys)} in all)" if len(keys) > _SHOWN_KEYS else f" ({len(keys)})"
    return ", ".join(keys[:_SHOWN_KEYS]) + more


def _check_layout(path: Path, state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> None:
    """Refuse a state dict whose keys or shapes are not the network's, naming what differs."""
    missing = [k for k in own if k not in state and not k.endswith(_OPTIONAL_SUFFIX)]
    unexpected = [k for k in state if k not in own]
    reshaped = [
        f"{k} {tuple(state[k].shape)} (want {tuple(own[k].shape)})"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_shown(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_shown(unexpected)}")
    if reshaped:
        problems.append(f"other shapes: {_shown(reshaped)}")
    if problems:
        raise SyncNetError(f"{path} is not a SyncNet (syncnet_v2) state dict: {'; '.join(problems)}. {CHECKPOINT_HINT}")


def load_syncnet(path: Path) -> SyncNet:
    """The SyncNet in the checkpoint at `path` (a plain state dict, as `syncnet_v2.model` is), on the CPU in eval
    mode. Loading is strict (every key, every shape; only BatchNorm's `num_batches_tracked` counters may be absent)
    and weights-only: a file that would unpickle code or objects is refused."""
    path = Path(path)
    state = _read_state(path)
    net = SyncNet()
    own = net.state_dict()
    _check_layout(path, state, own)
    full = {k: state.get(k, own[k]) for k in own}
    net.load_state_dict(full, strict=True)
    return net.eval()


def write_random_syncnet(path: Path, seed: int = 0) -> None:
    """Write a random-weight SyncNet checkpoint in `syncnet_v2.model`'s on-disk format (`torch.save` of the state
    dict) to `path`. BatchNorm running statistics are drawn too (mean ~ N(0, 0.1), var ~ U(0.5, 1.5)), so eval-mode
    BatchNorm is not the identity and a loader that skipped them would be caught."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = SyncNet()
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            assert module.running_mean is not None and module.running_var is not None
            size = module.num_features
            module.running_mean.copy_(0.1 * torch.randn(size, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(size, generator=generator))
            module.weight.data.copy_(0.8 + 0.4 * torch.rand(size, generator=generator))
            module.bias.data.copy_(0.1 * torch.randn(size, generator=generator))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
