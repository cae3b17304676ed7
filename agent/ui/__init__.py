"""The user's side: the command line, the live view, the report, the doctor."""
