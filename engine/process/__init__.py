"""Where the step loop runs for servers: a thread of this process, or an engine-core child process."""
