from bench.reliability.cli import main

main()
