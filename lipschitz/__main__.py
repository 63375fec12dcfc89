from lipschitz.cli import main

main()
