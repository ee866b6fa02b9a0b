"""feedback-predictor: command line and configuration shared by stream/ and trainer/."""
