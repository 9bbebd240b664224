"""The job: the pipeline (``render``), the service that runs it (``service``), the command line
(``cli``) and development tooling (``devkit``)."""
