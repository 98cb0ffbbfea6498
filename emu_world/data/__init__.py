"""Robot episode data: LeRobot datasets, subtask annotations and the token cache."""
