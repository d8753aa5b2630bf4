"""Files and attachments (issue 14): offers through the session, verified chunked
streams over QUIC, resume from the last verified group. The protocol is
:mod:`p2pd.files.protocol` (sans I/O), the rows :mod:`p2pd.files.store`, the trio
service :mod:`p2pd.files.service` (offers, accept, reject, cancel) with its sender
:mod:`p2pd.files.outgoing` and receiver :mod:`p2pd.files.incoming`, its wiring
:mod:`p2pd.files.glue`."""

from .glue import files_hooks
from .service import FilesService, FileSummary

__all__ = ["FileSummary", "FilesService", "files_hooks"]
