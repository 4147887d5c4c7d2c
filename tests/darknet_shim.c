/*
 * darknet_shim.c -- tiny plain-C helpers around the reference darknet
 * (pjreddie, Debian package "darknet", git 61c9d02e, 2018) so that
 * tests/darknet_ref.py can drive libdarknet through ctypes without
 * mirroring the huge `layer` / `network` structs in Python.
 *
 * Built on first use by tests/darknet_ref.py:
 *   gcc -O2 -shared -fPIC -I/usr/lib/darknet/include darknet_shim.c \
 *       -L/usr/lib/darknet -ldarknet -Wl,-rpath,/usr/lib/darknet -o libdarknet_shim.so
 *
 * Test-support code only; not part of the detkit package.
 */
#include <string.h>
#include <math.h>
#include "darknet.h"

/* Exported by libdarknet but not declared in darknet.h. */
void calc_network_cost(network *net);

#define DKS_ABI_VERSION 1

int dks_abi_version(void) { return DKS_ABI_VERSION; }

/* sizeof checks so Python can detect a header/library mismatch early. */
int dks_sizeof_layer(void) { return (int)sizeof(layer); }
int dks_sizeof_network(void) { return (int)sizeof(network); }

/* ------------------------------------------------------------------ */
/* network                                                             */
/* ------------------------------------------------------------------ */

/* load_network(cfg, weights or NULL, clear=0).  *parsed_batch receives the
 * batch the buffers were allocated for (cfg batch/subdivisions*time_steps). */
network *dks_load(const char *cfg, const char *weights, int *parsed_batch)
{
    network *net = load_network((char *)cfg, (char *)weights, 0);
    if (net && parsed_batch) *parsed_batch = net->batch;
    return net;
}

void dks_set_batch(network *net, int b) { set_batch_network(net, b); }

int dks_resize(network *net, int w, int h) { return resize_network(net, w, h); }

/* free_network() leaks seen/t/cost/workspace; free those too. */
void dks_free(network *net)
{
    if (!net) return;
    free(net->seen);      net->seen = 0;
    free(net->t);         net->t = 0;
    free(net->cost);      net->cost = 0;
    free(net->workspace); net->workspace = 0;
    free_network(net);
}

/* iv[0..11] = n, batch, w, h, c, inputs, outputs, truths, subdivisions,
 *             train, time_steps, notruth */
void dks_net_info(const network *net, int *iv)
{
    iv[0] = net->n;
    iv[1] = net->batch;
    iv[2] = net->w;
    iv[3] = net->h;
    iv[4] = net->c;
    iv[5] = net->inputs;
    iv[6] = net->outputs;
    iv[7] = net->truths;
    iv[8] = net->subdivisions;
    iv[9] = net->train;
    iv[10] = net->time_steps;
    iv[11] = net->notruth;
}

/* net->seen is a size_t* in this darknet. */
unsigned long long dks_get_seen(const network *net) { return net->seen ? (unsigned long long)*net->seen : 0ULL; }
void dks_set_seen(network *net, unsigned long long seen) { if (net->seen) *net->seen = (size_t)seen; }

/* ------------------------------------------------------------------ */
/* layers                                                              */
/* ------------------------------------------------------------------ */

#define DKS_NI 48
#define DKS_NF 24

/* Order must match _LAYER_INT_FIELDS / _LAYER_FLOAT_FIELDS in darknet_ref.py */
int dks_layer_info(const network *net, int i, int *iv, float *fv)
{
    if (i < 0 || i >= net->n) return -1;
    const layer *l = net->layers + i;
    int k = 0;
    iv[k++] = (int)l->type;
    iv[k++] = (int)l->activation;
    iv[k++] = l->batch;
    iv[k++] = l->inputs;
    iv[k++] = l->outputs;
    iv[k++] = l->h;
    iv[k++] = l->w;
    iv[k++] = l->c;
    iv[k++] = l->out_h;
    iv[k++] = l->out_w;
    iv[k++] = l->out_c;
    iv[k++] = l->n;
    iv[k++] = l->size;
    iv[k++] = l->stride;
    iv[k++] = l->pad;
    iv[k++] = l->groups;
    iv[k++] = l->classes;
    iv[k++] = l->coords;
    iv[k++] = l->batch_normalize;
    iv[k++] = l->total;
    iv[k++] = l->max_boxes;
    iv[k++] = l->truths;
    iv[k++] = l->softmax;
    iv[k++] = l->background;
    iv[k++] = l->rescore;
    iv[k++] = l->bias_match;
    iv[k++] = l->reverse;
    iv[k++] = l->flatten;
    iv[k++] = l->index;
    iv[k++] = l->binary;
    iv[k++] = l->xnor;
    iv[k++] = l->noloss;
    iv[k++] = l->nweights;
    iv[k++] = l->nbiases;
    iv[k++] = l->side;
    iv[k++] = l->sqrt;
    iv[k++] = l->random;
    iv[k++] = l->spatial;
    iv[k++] = l->extra;
    iv[k++] = l->truth;
    iv[k++] = l->dontload;
    iv[k++] = l->dontloadscales;
    iv[k++] = l->stopbackward;
    iv[k++] = l->onlyforward;
    iv[k++] = (int)l->cost_type;
    iv[k++] = l->mask != 0;
    iv[k++] = l->softmax_tree != 0;
    iv[k++] = l->map != 0;
    int ni = k;

    k = 0;
    fv[k++] = l->ignore_thresh;
    fv[k++] = l->truth_thresh;
    fv[k++] = l->thresh;
    fv[k++] = l->jitter;
    fv[k++] = l->object_scale;
    fv[k++] = l->noobject_scale;
    fv[k++] = l->class_scale;
    fv[k++] = l->coord_scale;
    fv[k++] = l->mask_scale;
    fv[k++] = l->temperature;
    fv[k++] = l->probability;
    fv[k++] = l->scale;
    fv[k++] = l->alpha;
    fv[k++] = l->beta;
    fv[k++] = l->kappa;
    fv[k++] = l->smooth;
    fv[k++] = l->clip;
    fv[k++] = l->learning_rate_scale;
    fv[k++] = l->cost ? l->cost[0] : NAN;
    fv[k++] = l->dot;
    fv[k++] = l->angle;
    fv[k++] = l->saturation;
    fv[k++] = l->exposure;
    fv[k++] = l->ratio;
    (void)ni;
    return 0;
}

static int copy_floats(const float *src, int n, float *dst, int cap)
{
    if (!src || n <= 0) return 0;
    if (dst) memcpy(dst, src, sizeof(float) * (size_t)(n < cap ? n : cap));
    return n;
}

static int copy_ints(const int *src, int n, int *dst, int cap)
{
    if (!src || n <= 0) return 0;
    if (dst) memcpy(dst, src, sizeof(int) * (size_t)(n < cap ? n : cap));
    return n;
}

/* Integer arrays of a layer.  which: 0 = mask (yolo, l.n entries),
 * 1 = input_layers (route, l.n), 2 = input_sizes (route, l.n).
 * Returns the number of entries available (copies min(n, cap) if dst). */
int dks_layer_ints(const network *net, int i, int which, int *dst, int cap)
{
    if (i < 0 || i >= net->n) return -1;
    const layer *l = net->layers + i;
    switch (which) {
    case 0: return l->type == YOLO ? copy_ints(l->mask, l->n, dst, cap) : 0;
    case 1: return l->type == ROUTE ? copy_ints(l->input_layers, l->n, dst, cap) : 0;
    case 2: return l->type == ROUTE ? copy_ints(l->input_sizes, l->n, dst, cap) : 0;
    }
    return -1;
}

/* Float parameter arrays of a layer.  which: 0 = biases, 1 = weights,
 * 2 = scales (BN gamma), 3 = rolling_mean, 4 = rolling_variance.
 * Sizes follow darknet's save_weights: conv biases n, weights nweights,
 * BN arrays n; connected biases outputs, weights inputs*outputs;
 * yolo biases total*2 (anchors); region biases n*2 (anchors). */
int dks_layer_params(const network *net, int i, int which, float *dst, int cap)
{
    if (i < 0 || i >= net->n) return -1;
    const layer *l = net->layers + i;
    int nb = 0, nw = 0, nbn = 0;
    switch (l->type) {
    case CONVOLUTIONAL:
    case DECONVOLUTIONAL:
        nb = l->n; nw = l->nweights; nbn = l->batch_normalize ? l->n : 0; break;
    case CONNECTED:
        nb = l->outputs; nw = l->inputs * l->outputs; nbn = l->batch_normalize ? l->outputs : 0; break;
    case YOLO:
        nb = l->total * 2; break;
    case REGION:
        nb = l->n * 2; break;
    case BATCHNORM:
        nb = l->c; nbn = l->c; break;
    default:
        return 0;
    }
    switch (which) {
    case 0: return copy_floats(l->biases, nb, dst, cap);
    case 1: return copy_floats(l->weights, nw, dst, cap);
    case 2: return copy_floats(l->scales, nbn, dst, cap);
    case 3: return copy_floats(l->rolling_mean, nbn, dst, cap);
    case 4: return copy_floats(l->rolling_variance, nbn, dst, cap);
    }
    return -1;
}

/* Copy l.output (which=0) or l.delta (which=1), l.outputs*l.batch floats.
 * Returns the number of floats available, 0 if the buffer is NULL. */
int dks_layer_buffer(const network *net, int i, int which, float *dst, int cap)
{
    if (i < 0 || i >= net->n) return -1;
    const layer *l = net->layers + i;
    const float *src = which == 0 ? l->output : l->delta;
    return copy_floats(src, l->outputs * l->batch, dst, cap);
}

/* *l.cost if the layer has one: returns 1 and writes *out, else 0. */
int dks_layer_cost(const network *net, int i, float *out)
{
    if (i < 0 || i >= net->n) return -1;
    const layer *l = net->layers + i;
    if (!l->cost) return 0;
    *out = l->cost[0];
    return 1;
}

/* ------------------------------------------------------------------ */
/* forward                                                             */
/* ------------------------------------------------------------------ */

/* Test-mode forward exactly as darknet's detector does it:
 * network_predict() points net->input at x (net->batch*net->inputs floats),
 * sets train=0, truth=0, delta=0, runs forward_network, then restores *net. */
void dks_predict(network *net, float *x)
{
    network_predict(net, x);
}

static int is_loss_layer(LAYER_TYPE t)
{
    return t == YOLO || t == REGION || t == DETECTION || t == COST ||
           t == ISEG || t == LOGXENT;
}

/* Training-mode forward without backward.
 * Copies x into net->input and truth into net->truth (as train_network's
 * get_next_batch does), sets *net->seen = seen, net->train = 1, then runs
 *   mode 0: forward_network(net) verbatim (BN uses batch statistics and
 *           updates rolling mean/variance; dropout is active);
 *   mode 1: the same loop, but only loss layers (yolo/region/detection/cost)
 *           see train=1 -- every other layer runs in test mode (BN with
 *           rolling statistics, no dropout); nothing is mutated except the
 *           layer outputs/deltas/costs.
 * Restores net->train/input/truth/delta afterwards; returns *net->cost
 * (mean of the layers' *l.cost, NaN if the net has no cost layer). */
float dks_train_forward(network *netp, const float *x, const float *truth,
                        unsigned long long seen, int mode)
{
    memcpy(netp->input, x, sizeof(float) * (size_t)netp->inputs * (size_t)netp->batch);
    if (netp->truth && truth)
        memcpy(netp->truth, truth, sizeof(float) * (size_t)netp->truths * (size_t)netp->batch);
    *netp->seen = (size_t)seen;

    float *old_delta = netp->delta;
    int old_train = netp->train;
    int old_index = netp->index;
    netp->delta = 0;
    netp->train = 1;

    if (mode == 0) {
        forward_network(netp);
    } else {
        network net = *netp;
        int i;
        for (i = 0; i < net.n; ++i) {
            net.index = i;
            layer l = net.layers[i];
            if (l.delta) fill_cpu(l.outputs * l.batch, 0, l.delta, 1);
            net.train = is_loss_layer(l.type) ? 1 : 0;
            l.forward(l, net);
            net.input = l.output;
            if (l.truth) net.truth = l.output;
        }
        calc_network_cost(netp);
    }
    fflush(stdout);

    netp->delta = old_delta;
    netp->train = old_train;
    netp->index = old_index;
    return netp->cost ? *netp->cost : NAN;
}

/* ------------------------------------------------------------------ */
/* detections                                                          */
/* ------------------------------------------------------------------ */

detection *dks_get_boxes(network *net, int w, int h, float thresh, float hier,
                         int relative, int *num)
{
    return get_network_boxes(net, w, h, thresh, hier, 0, relative, num);
}

int dks_last_classes(const network *net) { return net->layers[net->n - 1].classes; }

void dks_nms_sort(detection *dets, int n, int classes, float nms)
{
    do_nms_sort(dets, n, classes, nms);
}

int dks_det_classes(const detection *dets, int i) { return dets[i].classes; }

/* box4 = x, y, w, h (centre format); *obj = objectness; prob[classes]. */
void dks_det_copy(const detection *dets, int i, float *box4, float *obj, float *prob, int cap)
{
    const detection *d = dets + i;
    box4[0] = d->bbox.x;
    box4[1] = d->bbox.y;
    box4[2] = d->bbox.w;
    box4[3] = d->bbox.h;
    *obj = d->objectness;
    /* region detections leave d->classes at 0; their prob holds the last layer's classes */
    int n = (d->classes > 0 && d->classes < cap) ? d->classes : cap;
    if (d->prob && n > 0) memcpy(prob, d->prob, sizeof(float) * (size_t)n);
}

void dks_free_dets(detection *dets, int n) { free_detections(dets, n); }

/* ------------------------------------------------------------------ */
/* images (darknet's own loaders / resizers)                           */
/* ------------------------------------------------------------------ */

/* load_image_color(path, 0, 0): returns CHW RGB float [0,1].  Call with
 * dst=NULL to query w/h; returns 0 on success. */
int dks_load_image(const char *path, float *dst, int cap, int *w, int *h)
{
    image im = load_image_color((char *)path, 0, 0);
    *w = im.w;
    *h = im.h;
    int n = im.w * im.h * im.c;
    if (dst) memcpy(dst, im.data, sizeof(float) * (size_t)(n < cap ? n : cap));
    free_image(im);
    return 0;
}

/* letterbox_image / resize_image of a CHW float image given as an array. */
void dks_letterbox(const float *src, int w, int h, int c, int nw, int nh, float *dst)
{
    image im = make_image(w, h, c);
    memcpy(im.data, src, sizeof(float) * (size_t)w * h * c);
    image out = letterbox_image(im, nw, nh);
    memcpy(dst, out.data, sizeof(float) * (size_t)nw * nh * c);
    free_image(out);
    free_image(im);
}

void dks_resize_image(const float *src, int w, int h, int c, int nw, int nh, float *dst)
{
    image im = make_image(w, h, c);
    memcpy(im.data, src, sizeof(float) * (size_t)w * h * c);
    image out = resize_image(im, nw, nh);
    memcpy(dst, out.data, sizeof(float) * (size_t)nw * nh * c);
    free_image(out);
    free_image(im);
}
