"""kombu's ``filesystem://`` transport with atomic publishing (fixes celery/kombu#1551).

kombu 5.7's filesystem channel publishes with ``open(name, "wb")`` → ``flock`` → ``write``, and
its consumer never takes that lock: it ``shutil.move``-s the first ``*.msg`` file it sees and
reads it. A consumer can therefore grab a file that exists but is still empty or half written;
``json.loads`` fails and the message is gone. This channel writes ``tmp-<uuid>`` and renames it
into place, so a message file is complete from the moment it is visible. The temp name holds no
``.<queue>.msg`` at all: kombu 5.7 takes only names whose part after the first dot is exactly
``<queue>.msg``, but older kombu (5.3-5.6) takes any name that merely *contains* it, so a
``<name>.msg.tmp`` would be read half written there.

Select it with ``app.conf.broker_transport = "example_project.fs_transport:Transport"`` and keep
``broker_url = "filesystem://"``. The temp file and the queue folder are the same folder, so the
rename is atomic.
"""

from __future__ import annotations

import os
import uuid
from contextlib import suppress
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

__all__ = ["Channel", "Transport"]


class Channel(filesystem.Channel):
    """Filesystem channel whose messages appear in the queue folder complete or not at all."""

    # Same signature as kombu's filesystem channel (whose own stubs disagree with its base's).
    def _put(self, queue: str, payload: dict[str, Any], **kwargs: Any) -> None:  # type: ignore[override]
        # Same name as kombu's (consumers sort by it for FIFO order and match on ".<queue>.msg").
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        path = os.path.join(self.data_folder_out, name)
        # Never a name a consumer of any kombu version matches (see the module docstring).
        temp = os.path.join(self.data_folder_out, f"tmp-{uuid.uuid4().hex}")
        try:
            with open(temp, "wb") as f:
                f.write(str_to_bytes(dumps(payload)))
            os.rename(temp, path)
        except OSError as exc:
            with suppress(OSError):
                os.unlink(temp)
            raise ChannelError(f"Cannot add file {path!r} to directory") from exc


class Transport(filesystem.Transport):
    """``filesystem://`` transport using :class:`Channel`."""

    Channel = Channel
