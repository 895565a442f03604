/* berth's MPI benchmark: ping-pong latency and bandwidth between ranks 0 and 1 over a
 * range of sizes, then MPI_Allreduce of 1024 doubles many times. One rank per node.
 * Prints "pingpong BYTES USEC_ONE_WAY MB_PER_S" and "allreduce DOUBLES USEC_PER_CALL". */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    int rank, size;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    char *buf = malloc(1 << 22);
    for (int bytes = 1; bytes <= (1 << 22); bytes *= 4) {
        int iters = bytes < 65536 ? 2000 : 200;
        for (int pass = 0; pass < 2; pass++) { /* pass 0 warms up */
            MPI_Barrier(MPI_COMM_WORLD);
            double t0 = MPI_Wtime();
            for (int i = 0; i < iters && rank < 2; i++) {
                if (rank == 0) {
                    MPI_Send(buf, bytes, MPI_BYTE, 1, 0, MPI_COMM_WORLD);
                    MPI_Recv(buf, bytes, MPI_BYTE, 1, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
                } else {
                    MPI_Recv(buf, bytes, MPI_BYTE, 0, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
                    MPI_Send(buf, bytes, MPI_BYTE, 0, 0, MPI_COMM_WORLD);
                }
            }
            double one_way = (MPI_Wtime() - t0) / iters / 2;
            if (pass == 1 && rank == 0)
                printf("pingpong %d %.2f %.1f\n", bytes, one_way * 1e6, bytes / one_way / 1e6);
        }
    }
    double in[1024], out[1024];
    for (int i = 0; i < 1024; i++) in[i] = rank + i;
    for (int pass = 0; pass < 2; pass++) {
        int iters = 2000;
        MPI_Barrier(MPI_COMM_WORLD);
        double t0 = MPI_Wtime();
        for (int i = 0; i < iters; i++) MPI_Allreduce(in, out, 1024, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
        double per = (MPI_Wtime() - t0) / iters;
        if (pass == 1 && rank == 0) printf("allreduce 1024 %.2f\n", per * 1e6);
    }
    free(buf);
    MPI_Finalize();
    return 0;
}
