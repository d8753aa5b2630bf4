"""Files and attachments (issue 14): offers through the session, verified chunked
streams over QUIC, resume from the last verified group. The protocol is
:mod:`p2pd.files.protocol` (sans I/O), the rows :mod:`p2pd.files.store`, the trio
service :mod:`p2pd.files.service`, its wiring :mod:`p2pd.files.glue`."""

from .glue import files_hooks
from .service import FilesService, FileSummary

__all__ = ["FileSummary", "FilesService", "files_hooks"]
