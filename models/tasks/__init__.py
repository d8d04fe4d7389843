"""Fine-tuning tasks (image, audio and text classification, speech recognition with CTC): each owns its
head, its loss, its metrics and its labelled data, and takes any method's encoder. None yet."""
