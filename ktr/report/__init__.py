"""Key-token reports (layer L2, no Lightning): readable token pieces, report data, HTML pages, statistics.

`ktr.callbacks.KeyTokenReport` writes them during training, `ktr explain` for one video or image.
"""

from ktr.report.attribution import apply_noise_floor, explain_batch
from ktr.report.html import markdown_summary, render_index, render_page
from ktr.report.record import FORMAT, StepRecord, report_data, thumbnails
from ktr.report.stats import token_statistics, write_statistics
from ktr.report.tokens import Piece, readable_pieces
from ktr.report.write import write_index, write_report

__all__ = ["FORMAT", "Piece", "StepRecord", "apply_noise_floor", "explain_batch", "markdown_summary", "readable_pieces",
           "render_index", "render_page", "report_data", "thumbnails", "token_statistics", "write_index",
           "write_report", "write_statistics"]
