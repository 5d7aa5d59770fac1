from vae_lab.cli import exit_now
from vae_lab.serve.app import main

exit_now(main())
