/* Start the chat once the page is loaded. */
(function (ChatApp, $, _) {
  'use strict';

  $(function () {
    var controller = new ChatApp.MainController();
    controller.init();
    ChatApp.controller = controller; // for the browser console
  });

  // Files dropped beside the conversation are refused rather than opened
  // by the browser in place of the chat (the conversation takes them).
  $(document).on('dragover drop', function (event) {
    var transfer = event.originalEvent.dataTransfer;
    if (!transfer || !_.contains(_.toArray(transfer.types), 'Files') || event.originalEvent.defaultPrevented) {
      return;
    }
    event.preventDefault();
    transfer.dropEffect = 'none';
  });
})(ChatApp, jQuery, _);
