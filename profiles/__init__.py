"""OS profiles: ISF generation and loading, KASLR, syscall tables."""
