/* The relay's scan of a read's plain events, in one pass (issue #17): the C twin of
 * scan.plain_run, built with the compiled hot path (setup.py, MORNGPT_COMPILE=1).
 *
 * plain_run(block, strip) -> (head, count, rest, data)
 *
 * block: a run of complete stream events (sse.Cutter's). Walks its events from the
 * first while each is plain: one "data: {...}" line ("\n" line ends, the blank line
 * after it), not an error ("data: {\"error\"" at its start), and no "usage" key but
 * a null one ending the object (",\"usage\":null}" or ", \"usage\": null}", what
 * OpenAI, Azure and vLLM send on every chunk when usage is asked for). head: those
 * events, as the client gets them (with strip, without those null members); count:
 * how many; rest: the bytes from the first event that is not plain on, which the
 * relay parses one by one (_Watch.keep). A read with a "\r" anywhere is all rest.
 * data: when rest is one event of one "data: " line, alone or before the stream's
 * "data: [DONE]" (a stream's usage chunk and its end, as they come), that line's
 * value, which is what an SSE parser makes its data (the relay reads it without one);
 * else None.
 *
 * Exact, never a guess: an event that may hold a usage (any other "usage" key), an
 * error or anything but a plain line is in rest. Per byte, memchr (glibc's): one pass
 * over the read where the Python scans make several.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static const char START[] = "data: {";
static const char DATA[] = "data: ";
static const char DONE[] = "data: [DONE]\n\n";
static const char ERROR[] = "data: {\"error\"";
static const char KEY[] = "\"usage\"";
/* The null usage members that may end a plain event's object, with the "}". */
static const char NULL_TIGHT[] = ",\"usage\":null}";
static const char NULL_SPACED[] = ", \"usage\": null}";

#define LEN(s) ((Py_ssize_t)(sizeof(s) - 1))

/* The first "usage" key in s[0..n), or NULL. Found by its 'g', the rarest of its
 * bytes in a chunk's JSON (none in OpenAI's member names; the ones in a token are
 * few), with memchr, which goes 32 bytes a step: glibc's memmem for a short needle
 * goes about a byte a step, ~480 instructions on a 150-byte event line against ~100. */
static const char *
find_key(const char *s, Py_ssize_t n)
{
    if (n < LEN(KEY))
        return NULL;
    const char *p = s + 4; /* the 'g' of a key at s */
    const char *end = s + n - 2; /* and its "e\"" after it */
    while (p < end && (p = memchr(p, 'g', (size_t)(end - p))) != NULL) {
        if (memcmp(p - 4, KEY, (size_t)LEN(KEY)) == 0)
            return p - 4;
        p++;
    }
    return NULL;
}

/* How many bytes of a null usage member end the line (0: none), or -1 when the line
 * holds a "usage" key that is not that member. line[0..len) ends with "}". */
static Py_ssize_t
null_tail(const char *line, Py_ssize_t len)
{
    const char *key = find_key(line, len);
    if (key == NULL)
        return 0;
    if (len >= LEN(NULL_TIGHT) && key == line + len - LEN(NULL_TIGHT) + 1 &&
        memcmp(line + len - LEN(NULL_TIGHT), NULL_TIGHT, LEN(NULL_TIGHT)) == 0)
        return LEN(NULL_TIGHT) - 1;
    if (len >= LEN(NULL_SPACED) && key == line + len - LEN(NULL_SPACED) + 2 &&
        memcmp(line + len - LEN(NULL_SPACED), NULL_SPACED, LEN(NULL_SPACED)) == 0)
        return LEN(NULL_SPACED) - 1;
    return -1;
}

/* The value of the one "data: " line of the event at s[0..n), where that event is all
 * of it or is followed by DONE and nothing else; NULL (no error set) otherwise. s
 * holds no "\r". */
static PyObject *
lone_data(const char *s, Py_ssize_t n)
{
    Py_ssize_t end = n;
    if (n - LEN(DONE) > 0 && memcmp(s + n - LEN(DONE), DONE, LEN(DONE)) == 0)
        end = n - LEN(DONE);
    Py_ssize_t len = end - 2 - LEN(DATA); /* the value's, before the line end and blank */
    if (len < 0 || memcmp(s, DATA, LEN(DATA)) != 0 || s[end - 2] != '\n' ||
        s[end - 1] != '\n' || memchr(s + LEN(DATA), '\n', (size_t)len) != NULL)
        return NULL;
    return PyBytes_FromStringAndSize(s + LEN(DATA), len);
}

static PyObject *
plain_run(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyBytes_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "plain_run(block: bytes, strip: bool)");
        return NULL;
    }
    PyObject *block = args[0];
    int strip = PyObject_IsTrue(args[1]);
    if (strip < 0)
        return NULL;
    const char *s = PyBytes_AS_STRING(block);
    Py_ssize_t n = PyBytes_GET_SIZE(block);
    Py_ssize_t pos = 0, count = 0, written = 0;
    PyObject *out = NULL; /* the stripped head, made at the first null stripped */
    int lines = memchr(s, '\r', (size_t)n) == NULL; /* "\n" line ends only */

    if (lines) {
        while (n - pos > LEN(START) && memcmp(s + pos, START, LEN(START)) == 0) {
            const char *line = s + pos;
            const char *nl = memchr(line, '\n', (size_t)(n - pos));
            if (nl == NULL)
                break;
            Py_ssize_t len = nl - line;
            if (pos + len + 1 >= n || nl[1] != '\n' || line[len - 1] != '}')
                break; /* more than one line, or not an object's end */
            if (len >= LEN(ERROR) && memcmp(line, ERROR, LEN(ERROR)) == 0)
                break;
            Py_ssize_t tail = null_tail(line, len);
            if (tail < 0)
                break;
            if (strip && tail) {
                if (out == NULL) {
                    out = PyBytes_FromStringAndSize(NULL, n);
                    if (out == NULL)
                        return NULL;
                    memcpy(PyBytes_AS_STRING(out), s, (size_t)pos);
                    written = pos;
                }
                char *to = PyBytes_AS_STRING(out) + written;
                Py_ssize_t kept = len - 1 - tail;
                memcpy(to, line, (size_t)kept);
                memcpy(to + kept, "}\n\n", 3);
                written += kept + 3;
            }
            else if (out != NULL) {
                memcpy(PyBytes_AS_STRING(out) + written, line, (size_t)(len + 2));
                written += len + 2;
            }
            count++;
            pos += len + 2;
        }
    }
    PyObject *head;
    if (out != NULL) {
        if (_PyBytes_Resize(&out, written) < 0)
            return NULL;
        head = out;
    }
    else if (pos == n) {
        Py_INCREF(block);
        head = block;
    }
    else {
        head = PyBytes_FromStringAndSize(s, pos);
        if (head == NULL)
            return NULL;
    }
    PyObject *rest;
    if (pos == 0) {
        Py_INCREF(block);
        rest = block;
    }
    else {
        rest = PyBytes_FromStringAndSize(s + pos, n - pos);
    }
    if (rest == NULL) {
        Py_DECREF(head);
        return NULL;
    }
    PyObject *data = lines && pos < n ? lone_data(s + pos, n - pos) : NULL;
    if (data == NULL) {
        if (PyErr_Occurred()) {
            Py_DECREF(head);
            Py_DECREF(rest);
            return NULL;
        }
        data = Py_NewRef(Py_None);
    }
    return Py_BuildValue("(NnNN)", head, count, rest, data);
}

static PyMethodDef methods[] = {
    {"plain_run", (PyCFunction)(void (*)(void))plain_run, METH_FASTCALL,
     "plain_run(block, strip) -> (head, count, rest, data): see proxy/http/_plain.c."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_plain", "The relay's one-pass scan of plain events.", -1, methods,
};

PyMODINIT_FUNC
PyInit__plain(void)
{
    return PyModule_Create(&module);
}
