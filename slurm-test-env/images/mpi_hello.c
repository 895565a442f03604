/* The mpi test image's program: every rank prints where it runs and which OS image it
 * sees, so tests can check that ranks cover all nodes and run inside the image. */
#include <mpi.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static void os_id(char *out, size_t len) {
    char line[256];
    FILE *f = fopen("/etc/os-release", "r");
    snprintf(out, len, "unknown");
    if (!f) return;
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "ID=", 3) == 0) {
            line[strcspn(line, "\n")] = 0;
            snprintf(out, len, "%s", line + 3 + (line[3] == '"'));
            out[strcspn(out, "\"")] = 0;
            break;
        }
    }
    fclose(f);
}

int main(int argc, char **argv) {
    int rank, size;
    char host[256], os[64];
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    gethostname(host, sizeof host);
    os_id(os, sizeof os);
    printf("rank %d of %d on %s os=%s\n", rank, size, host, os);
    MPI_Finalize();
    return 0;
}
