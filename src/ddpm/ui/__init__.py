"""`ddpm ui`: a local web page over the library to watch, steer and compare diffusion (needs ddpm[ui])."""


from collections.abc import Sequence


def serve(runs: list[str], runs_dir: str | None, host: str = "127.0.0.1", port: int = 8000,
          device: str = "cpu", allow_hosts: Sequence[str] = ()) -> None:
    """Serve the page (see ddpm.ui.app.serve); a one-line error when the ui extra is missing."""
    from ..errors import DdpmError

    try:
        from .app import serve as _serve
    except ModuleNotFoundError as e:
        raise DdpmError(f"`ddpm ui` needs {e.name}: pip install 'ddpm[ui]'") from None
    _serve(runs, runs_dir, host, port, device, allow_hosts)
