"""Stage 4, quality: the meter and its models (``meter``, ``speaker``, ``wheels``), the repair loop
(``repair``) and the report page (``report_page``)."""
